"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

from pathlib import Path


def _cpuinfo(field: str) -> str:
    """The first ``field`` of /proc/cpuinfo ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        if line.startswith(field):
            return line.partition(":")[2].strip()
    return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    return _cpuinfo("model name") or "unknown"


def simd() -> str:
    """The widest vector extension TensorFlow's CPU kernels use here: avx512, avx2 or other."""
    flags = _cpuinfo("flags").split()
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
