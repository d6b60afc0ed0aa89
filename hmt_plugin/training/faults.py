"""Failures of the other ranks, told apart from our own errors and reported as such.

When a rank dies or stalls, the survivors are left inside a collective (an FSDP all-gather,
the loss all-reduce, a barrier) until the process-group timeout (``distributed_timeout_s``)
or a closed connection ends it. gloo then raises a bare ``RuntimeError`` quoting its own
source file, NCCL a ``DistBackendError``: neither says that the problem is another rank.
"""

from typing import Optional

import torch.distributed as dist

# gloo reports transport failures as plain RuntimeErrors; these are their tell-tale phrases.
_GLOO_SIGNS = ("gloo", "Timed out waiting", "Connection closed by peer", "Connection reset by peer")


class CollectiveFailure(RuntimeError):
    """A collective with the other ranks failed: one of them most likely died or stalled."""


def is_collective_failure(err: BaseException) -> bool:
    """True for errors raised by a collective operation of ``torch.distributed``."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err) for sign in _GLOO_SIGNS)


def collective_failure(
    err: BaseException,
    *,
    rank: int,
    world_size: int,
    step: int,
    timeout_s: float,
    latest_checkpoint: Optional[str],
) -> CollectiveFailure:
    """The error a surviving rank raises instead of ``err`` (chain it: ``raise ... from err``)."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CollectiveFailure(
        f"rank {rank} of {world_size}: a collective operation with the other ranks failed after "
        f"step {step} ({first_line}). Another rank most likely died or stalled; torchrun's "
        "summary names the first rank that failed and its exit code (-9: killed, e.g. out of "
        f"memory). The wait was bounded by distributed_timeout_s={timeout_s:g}. Fix that rank's "
        "problem, then rerun with resume_from_checkpoint=True (last complete checkpoint: "
        f"{latest_checkpoint or 'none yet'})."
    )
