"""Memory measurement that can be trusted on CPU as well as CUDA.

torch keeps no allocator statistics on CPU. Process RSS is the honest secondary metric there: Linux lets a process
reset its own peak (``/proc/self/clear_refs`` with ``5`` resets VmHWM), so "peak RSS during a phase minus RSS
before it" measures the phase alone. Benchmarks run each configuration in a fresh subprocess so one run's freed
memory cannot hide the next one's growth.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux only). Returns False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (or process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
