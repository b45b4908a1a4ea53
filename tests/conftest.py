"""Shared fixtures: where the real data lives, and a quiet TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MIAS_ARCHIVE = SHARED_DATA / "mias" / "all-mias.tar.gz"
CMMD_DIR = SHARED_DATA / "cmmd"


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def mias_archive() -> Path:
    if not MIAS_ARCHIVE.is_file():
        pytest.skip(f"real MIAS archive not found at {MIAS_ARCHIVE}")
    return MIAS_ARCHIVE


@pytest.fixture(scope="session")
def cmmd_dir() -> Path:
    if not (CMMD_DIR / "CMMD_clinicaldata_revision.xlsx").is_file():
        pytest.skip(f"real CMMD clinical table not found under {CMMD_DIR}")
    return CMMD_DIR
