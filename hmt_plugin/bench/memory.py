"""Peak memory of one benchmark run, and what the number means.

The probes themselves live in :mod:`hmt_plugin.eval.memory` (the long-context scorer uses
them too); this module picks one per device and runs a function under it.

* CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated at the
  start: the bytes of live tensors the run added at its peak (weights not included).
* CPU, ``tensor_bytes`` (default): the peak total size of CPU tensor storages created during
  the run and still alive, tracked op by op. Exact and repeatable whatever else runs on the
  machine, which RSS is not; weights and the input document are not counted. It costs a few
  microseconds of Python per op, so it is measured on the warm-up run, never a timed one.
* CPU, ``rss``: resident set size above the start, sampled every 2 ms by a thread; what the
  OS sees (allocator caching included). Cheap, so the speed benchmark also samples it during
  its timed runs and reports it beside the exact figure.
"""

from typing import Any, Callable, Optional, Tuple

import torch

from hmt_plugin.eval.memory import MemoryProbe, RSSProbe, memory_probe

PROBE_CHOICES = ("auto", "cuda", "tensor_bytes", "rss", "none")


def make_probe(kind: str, device: torch.device) -> MemoryProbe:
    """``auto``: ``cuda`` on a CUDA device, ``tensor_bytes`` elsewhere."""
    return memory_probe(kind, device)


def describe(probe: MemoryProbe) -> str:
    return f"{probe.name}: {probe.description}"


def run_measured(fn: Callable[[], Any], probe: MemoryProbe) -> Tuple[Any, Optional[float]]:
    """``fn()`` under ``probe``; returns its result and the peak in MiB (None: unmeasured)."""
    with probe.measure() as reading:
        result = fn()
    return result, reading.peak_mb


def rss_sampler(device: torch.device) -> Optional[RSSProbe]:
    """An RSS sampler for timed CPU runs (None on CUDA, where host RSS says little)."""
    return RSSProbe(interval_s=0.002) if torch.device(device).type == "cpu" else None
