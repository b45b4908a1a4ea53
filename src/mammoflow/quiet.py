"""TensorFlow's start-up chatter, filtered out of stderr on a machine without CUDA.

Importing TensorFlow prints C++ log lines before its logging is initialised, so neither
``TF_CPP_MIN_LOG_LEVEL`` nor absl flags reach them: "All log messages before
absl::InitializeLog()", "Could not find cuda drivers", "failed call to cuInit", "oneDNN custom
operations are on". Code that needs TensorFlow or Keras gets it from :func:`load_tensorflow` /
:func:`load_keras`, which run the *first* import and device listing in a file-descriptor level
filter: those known lines are dropped, every other line reaches stderr unchanged. Importing
this module imports nothing heavy (and installs nothing: no import hook).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType

#: Substrings of the start-up lines that are dropped (nothing else is).
NOISE: tuple[str, ...] = (
    "All log messages before absl::InitializeLog()",
    "cudart_stub.cc",
    "Could not find cuda drivers",
    "cuda_platform.cc",
    "failed call to cuInit",
    "oneDNN custom operations are on",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
    "cuda_executor.cc",
    "gpu_device.cc",
)


def is_noise(line: str, noise: Sequence[str] = NOISE) -> bool:
    """True for a known start-up line."""
    return any(n in line for n in noise)


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str] = NOISE) -> Iterator[None]:
    """Send fd 2 to a temporary file in the block, then replay its lines that are not noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): filter nothing
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                line
                for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not is_noise(line, noise)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def load_tensorflow() -> ModuleType:
    """``import tensorflow``: the first time (and its first device listing, where cuInit runs)
    inside :func:`filtered_stderr`; later calls return the imported module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        with filtered_stderr():
            import tensorflow

            with contextlib.suppress(Exception):
                tensorflow.config.list_physical_devices()
    return sys.modules["tensorflow"]


def load_keras() -> ModuleType:
    """``import keras`` (TensorFlow first, through :func:`load_tensorflow`)."""
    load_tensorflow()
    import keras

    return keras
