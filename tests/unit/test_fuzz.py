"""The short fuzz run: malformed DICOMs and PGMs end accepted or as a named quarantine reason.

``benchmarks/fuzz_inputs.py --cases 2000`` is the long run (a worker process, a per-case
timeout, a memory limit); this runs a few cases of every mutation in-process through the same
contract (:func:`mammoflow.data.fuzz.run_case`): ingest in quarantine and fail mode, convert.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest

from mammoflow.data.fuzz import (
    DICOM_MUTATIONS,
    PGM_MUTATIONS,
    Case,
    Seeds,
    make_seeds,
    mutate,
    plan_cases,
    reason_name,
    run_case,
)

ARCHIVE = Path(__file__).resolve().parents[2] / "../shared/data/mias/all-mias.tar.gz"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return make_seeds(tmp_path_factory.mktemp("seeds"), ARCHIVE if ARCHIVE.is_file() else None)


def test_every_mutation_ends_accepted_or_named(seeds: Seeds, tmp_path: Path) -> None:
    cases = [
        Case(i * 10 + k, kind, k % len(pool), name, 1000 + i * 10 + k)
        for kind, names, pool in (
            ("dicom", DICOM_MUTATIONS, seeds.dicoms),
            ("pgm", PGM_MUTATIONS, seeds.pgms),
        )
        for i, name in enumerate(names)
        for k in range(3)
    ]
    seen: Counter[str] = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on each malformed value
        for case in cases:
            outcome = run_case(seeds, case, tmp_path / "work")
            assert outcome.status in ("accepted", "quarantined"), (case, outcome)
            assert outcome.reason != "unnamed", (case, outcome)
            seen[outcome.reason or outcome.status] += 1
    assert {"pixel_limit", "bad_voi_lut", "pgm_bad_maxval", "no_laterality"} <= set(seen)
    assert not (tmp_path / "work").exists()  # each case cleans up


def test_cases_are_deterministic(seeds: Seeds) -> None:
    first, second = plan_cases(seeds, 30, 5), plan_cases(seeds, 30, 5)
    assert first == second
    assert [mutate(seeds, c) for c in first[:10]] == [mutate(seeds, c) for c in second[:10]]


def test_reason_names() -> None:
    assert reason_name("truncated PGM: the header needs 10 bytes") == "pgm_truncated"
    assert reason_name("declares 3,600,000,000 pixels (...), above the limit of 1") == "pixel_limit"
    assert reason_name("something nobody wrote a pattern for") == "unnamed"
