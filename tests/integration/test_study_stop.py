"""A study stopped by SIGTERM stops its DVC experiment too, and puts params.yaml back.

`mammoflow study` runs `dvc exp run` as a child; before, SIGTERM raised KeyboardInterrupt in the
study while DVC and its stage went on for minutes. Here the stage sleeps; the study's process
must end within seconds, with no stage process left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import GIT_ID

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DVC = str(Path(sys.executable).with_name("dvc"))
STUDY = """
import sys
from pathlib import Path

from mammoflow.console import Stopped, interrupt_on_sigterm
from mammoflow.dvc_runner import exp_run

interrupt_on_sigterm()
try:
    exp_run(Path(sys.argv[1]), ["++epochs=2"], on_line=lambda line: print(line, flush=True))
except Stopped:
    sys.exit(143)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_sigterm_stops_the_experiment_and_its_stage(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text("epochs: 1\n", encoding="utf-8")
    (root / "dvc.yaml").write_text(
        "stages:\n  slow:\n    cmd: sh -c 'echo $$ > stage.pid; exec sleep 300'\n"
        "    params: [epochs]\n",
        encoding="utf-8",
    )
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    (root / ".gitignore").write_text("stage.pid\n", encoding="utf-8")
    subprocess.run(["git", *GIT_ID, "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", *GIT_ID, "commit", "-qm", "p"], cwd=root, check=True)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    study = subprocess.Popen(
        [sys.executable, "-c", STUDY, str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a signal to the test's group does not reach it
    )
    stage = 0
    try:
        pid_file = root / "stage.pid"
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text().strip():
            assert study.poll() is None, study.communicate()[0]
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.2)
        stage = int(pid_file.read_text())
        assert _alive(stage)
        stopped = time.monotonic()
        study.send_signal(signal.SIGTERM)
        output = study.communicate(timeout=60)[0]
        assert study.returncode == 143, output
        assert time.monotonic() - stopped < 30, output
        deadline = time.monotonic() + 10
        while _alive(stage) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(stage), f"the stage (pid {stage}) outlived the study"
    finally:  # whatever failed, nothing of this test keeps running
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
        if stage and _alive(stage):
            os.kill(stage, signal.SIGKILL)
    assert (root / "params.yaml").read_text(encoding="utf-8") == "epochs: 1\n"
