"""TensorFlow's start-up chatter, filtered out of stderr on a machine without CUDA.

Importing TensorFlow prints C++ log lines before its logging is initialised, so neither
``TF_CPP_MIN_LOG_LEVEL`` nor absl flags reach them: "All log messages before
absl::InitializeLog()", "Could not find cuda drivers", "failed call to cuInit", "oneDNN custom
operations are on". :func:`install` puts a finder on ``sys.meta_path`` that wraps the *first*
``import tensorflow`` (direct or through Keras) and the first device listing in a file-descriptor
level filter: those known lines are dropped, every other line reaches stderr unchanged.
Importing this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
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


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with filtered_stderr():
            self.inner.exec_module(module)
            # cuInit runs at the first device query: do it here, inside the filter
            with contextlib.suppress(Exception):
                module.config.list_physical_devices()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        uninstall()  # once; the real finders do the work
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Filter the start-up lines of the first ``import tensorflow`` (no-op if already imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the finder."""
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)
