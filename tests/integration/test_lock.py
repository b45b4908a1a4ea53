"""The committed dvc.lock (and so metrics/ and plots/) is the output of the committed code.

`dvc status` against the lock must report no changed params and no changed code dependency:
whoever changes a stage's code or params regenerates the lock (`make run`) in the same commit.
Missing data (a fresh clone has no data/) is expected and ignored here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CODE = ("src/", "bin/", "flows/")


def test_committed_lock_matches_code_and_params() -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    res = subprocess.run(
        [dvc, "status", "--json", "dvc.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    drift: list[str] = []
    for stage, changes in json.loads(res.stdout or "{}").items():
        for change in changes if isinstance(changes, list) else []:
            if change == "changed command":
                drift.append(f"{stage}: command changed")
            if not isinstance(change, dict):
                continue
            for path, state in change.get("changed deps", {}).items():
                if path.startswith(CODE) or path.endswith("params.yaml") or isinstance(state, dict):
                    drift.append(f"{stage}: {path} {state}")
    assert not drift, (
        "dvc.lock is stale for the committed code/params; run `make run` and commit dvc.lock, "
        "metrics/ and plots/:\n" + "\n".join(drift)
    )
