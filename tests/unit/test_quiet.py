"""quiet.py: TensorFlow's CUDA / absl start-up lines never reach a CPU user's terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mammoflow.quiet import filtered_stderr, is_noise


def test_filter_drops_known_lines_and_keeps_the_rest(capfd: pytest.CaptureFixture[str]) -> None:
    with filtered_stderr():
        os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
        os.write(2, b"a real warning from a C library\n")
    err = capfd.readouterr().err
    assert "cuInit" not in err
    assert "a real warning from a C library" in err
    assert is_noise("I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine")
    assert not is_noise("ValueError: mdb001.pgm is not a PGM file")


def test_load_keras_prints_no_cuda_noise_and_importing_mammoflow_hooks_nothing() -> None:
    code = (
        "import sys; hooks = list(sys.meta_path); import mammoflow.cli; "
        "assert sys.meta_path == hooks, sys.meta_path; "
        "from mammoflow.quiet import load_keras, load_tensorflow; keras = load_keras(); "
        "tf = load_tensorflow(); print(float(tf.constant(1.0) + 1), keras.__name__)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2.0 keras"
    for noise in ("cuda", "cuInit", "absl::InitializeLog", "oneDNN custom operations"):
        assert noise not in res.stderr, res.stderr
