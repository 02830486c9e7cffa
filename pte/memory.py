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


def reset_peak(device: "torch.device") -> None:
    """Start a peak-memory measurement on ``device``: CUDA's allocator statistics, else this process's RSS."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak(device: "torch.device") -> tuple[int, str]:
    """-> (peak bytes since :func:`reset_peak`, what was measured: ``cuda_max_allocated`` or ``cpu_peak_rss``)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_peak_rss"


class LiveTensorBytes:
    """Peak bytes of tensor storages allocated inside the block and alive at once (CPU or CUDA).

    A ``TorchDispatchMode`` sees every op's outputs, including those of backward; each new storage is counted
    until its finaliser runs. An output on the storage of one of the op's inputs (a view such as a weight's
    transpose, or an in-place result) is no allocation and is not counted. Works on fake tensors too. Tensors that existed before the block (the weights) are not counted, so this is
    the working memory of what runs inside: activations, saved tensors, caches, gradients, optimizer state.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                inputs = {_storage_key(t) for t in _tree_tensors((args, tuple(kwargs.values())))}
                for t in _tree_tensors(out):
                    if _storage_key(t) not in inputs:  # a view or in-place result allocates nothing
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def _track(self, t) -> None:
        import weakref

        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage._cdata
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def _storage_key(t) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _tree_tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _tree_tensors(o)


def measure_step(fn, device: str = "cpu") -> dict:
    """Run ``fn()`` once and report its memory: peak live tensor bytes (primary, any device), and on CUDA
    ``max_memory_allocated`` above the starting allocation. The one helper every benchmark uses."""
    import gc

    import torch

    gc.collect()
    out = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with LiveTensorBytes() as tracker:
        fn()
    out["peak_bytes"] = tracker.peak
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - start
    return out
