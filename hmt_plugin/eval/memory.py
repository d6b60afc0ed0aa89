"""Peak memory of a stretch of evaluation, measured three ways.

* ``cuda``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes held
  by live tensors in the caching allocator; the allocator's reserved-but-free blocks are not
  counted).
* ``tensor_bytes`` (CPU): the peak total size of the CPU tensor storages created inside the
  measured stretch and still alive, tracked op by op with a ``TorchDispatchMode`` (a storage
  counts from the op that creates it until it is freed; views and in-place results count
  nothing). Exact and deterministic, independent of the allocator; weights and anything made
  before the stretch are not counted. Costs a few microseconds of Python per op.
* ``rss``: the process's resident set size, sampled by a thread every ``interval_s``, above its
  value at the start (after ``gc`` and glibc ``malloc_trim``). What the operating system sees,
  allocator caching and fragmentation included; it can miss spikes shorter than the interval.

``auto`` is ``cuda`` on a CUDA device and ``tensor_bytes`` elsewhere.
"""

import ctypes
import gc
import os
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PROBES = ("auto", "cuda", "tensor_bytes", "rss", "none")


@dataclass
class MemoryReading:
    """Filled in when a :meth:`MemoryProbe.measure` block exits.

    Attributes:
        peak_bytes: peak above the level at the start of the block (None: not measured).
        absolute_bytes: the peak including what was allocated before (``cuda``, ``rss``).
    """

    peak_bytes: Optional[int] = None
    absolute_bytes: Optional[int] = None

    @property
    def peak_mb(self) -> Optional[float]:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20


class MemoryProbe:
    """Base class: ``with probe.measure() as reading: ...`` then read ``reading.peak_bytes``."""

    name = "none"
    description = "not measured"

    @contextmanager
    def measure(self) -> Iterator[MemoryReading]:
        yield MemoryReading()


class CudaPeakMemory(MemoryProbe):
    name = "cuda"
    description = "torch.cuda.max_memory_allocated above the allocation at the start (live tensors)"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextmanager
    def measure(self) -> Iterator[MemoryReading]:
        reading = MemoryReading()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        try:
            yield reading
        finally:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reading.absolute_bytes = int(peak)
            reading.peak_bytes = int(peak - start)


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of CPU storages that ops create, until each is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: Set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._tracked:
                continue  # a view or an in-place result: nothing new
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            # The Python storage object lives exactly as long as the storage (PyTorch keeps
            # them together), so its finalizer runs when the memory is released.
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


class TensorBytesProbe(MemoryProbe):
    name = "tensor_bytes"
    description = "peak bytes of live CPU tensor storages created during the measurement"

    @contextmanager
    def measure(self) -> Iterator[MemoryReading]:
        reading = MemoryReading()
        mode = _LiveStorages()
        try:
            with mode:
                yield reading
        finally:
            reading.peak_bytes = int(mode.peak)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil  # not Linux

        return int(psutil.Process().memory_info().rss)


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


class RSSProbe(MemoryProbe):
    name = "rss"
    description = "peak resident set size above the start, sampled by a thread"

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s

    @contextmanager
    def measure(self) -> Iterator[MemoryReading]:
        reading = MemoryReading()
        _trim_heap()
        start = _rss_bytes()
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(self.interval_s)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield reading
        finally:
            done.set()
            thread.join()
            peak[0] = max(peak[0], _rss_bytes())
            reading.absolute_bytes = int(peak[0])
            reading.peak_bytes = int(peak[0] - start)


def memory_probe(kind: str, device: torch.device) -> MemoryProbe:
    """The probe called ``kind`` (one of :data:`PROBES`) for ``device``."""
    if kind not in PROBES:
        raise ValueError(f"memory_probe={kind!r} is unknown; use one of {', '.join(PROBES)}.")
    device = torch.device(device)
    if kind == "auto":
        kind = "cuda" if device.type == "cuda" else "tensor_bytes"
    if kind == "cuda":
        if device.type != "cuda":
            raise ValueError(f"memory_probe='cuda' needs a CUDA device; the model is on {device}.")
        return CudaPeakMemory(device)
    if kind == "tensor_bytes":
        return TensorBytesProbe()
    if kind == "rss":
        return RSSProbe()
    return MemoryProbe()
