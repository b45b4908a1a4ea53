"""`mammoflow serve` stopped by SIGTERM or SIGINT leaves no process behind and frees the port.

A real (tiny) pyfunc model is saved to a folder and served through the real command; the
wrapper is signalled once the server answers /ping; afterwards nothing of its process group
runs and nothing listens on the port.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import stop_process_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAMMOFLOW = str(Path(sys.executable).with_name("mammoflow"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
            return model_input

    path = tmp_path_factory.mktemp("model") / "echo"
    mlflow.pyfunc.save_model(str(path), python_model=Echo())
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_server_on_a_signal(model_dir: Path, tmp_path: Path, signum: int) -> None:
    port = _free_port()
    log = (tmp_path / "serve.log").open("wb")
    wrapper = subprocess.Popen(
        [
            MAMMOFLOW,
            "serve",
            "--dataset",
            "sample_mias",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--format",  # the echo model as it is (the file wrapper needs a Keras champion)
            "tensor",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,  # the test's own clean-up can reach everything it started
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert wrapper.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        server = [p for p in psutil.Process(wrapper.pid).children(recursive=True)]
        assert server, "the wrapper runs the server as its child"
        wrapper.send_signal(signum)
        code = wrapper.wait(timeout=60)
        _gone, alive = psutil.wait_procs(server, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
        deadline = time.monotonic() + 15
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(port), f"port {port} still has a listener"
        assert code == 128 + signum  # the shell's convention for "stopped by a signal"
    finally:
        stop_process_tree(wrapper)
        log.close()
