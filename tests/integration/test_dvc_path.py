"""dvc.yaml's commands run however dvc was started: `.venv/bin/dvc repro` from a shell whose PATH
lacks .venv/bin (once "mammoflow: command not found", exit 127)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_project

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _path_without_venv() -> str:
    keep = [
        p
        for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if p and Path(p).resolve() != VENV_BIN.resolve() and not p.endswith(".venv/bin")
    ]
    return os.pathsep.join(keep)


def test_dvc_repro_with_a_path_lacking_the_venv(tmp_path: Path) -> None:
    project = tmp_path / "project"
    copy_project(project)
    (project / ".venv").symlink_to(ROOT / ".venv")  # the checkout's own venv, as after `make`
    raw = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    raw["pipeline"]["datasets"] = ["sample_mias"]
    raw["sample"].update({"mias_patients": 6, "size": 64})
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env["PATH"] = _path_without_venv()
    assert shutil.which("mammoflow", path=env["PATH"]) is None, env["PATH"]
    res = subprocess.run(
        [str(project / ".venv" / "bin" / "dvc"), "repro", "acquire@sample_mias"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "command not found" not in out
    assert "Running stage 'acquire@sample_mias'" in out
    assert "bin/mammoflow acquire sample_mias" in out
    assert any((project / "data" / "raw" / "sample_mias").rglob("*.pgm"))
