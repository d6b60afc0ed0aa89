"""Per-segment activation checkpointing for HMT's training read.

A training window of D segments backpropagates through all D backbone calls (that is what
BPTT buys), so without checkpointing the activations of every segment stay alive until the
backward pass: activation memory grows linearly with ``bptt_depth``. With
``HMT.forward(..., checkpoint_segments=True)`` each backbone call (the batched
representation pass, each segment's recall pass, and the loss head of a segment that carries
gradient) keeps only its inputs and outputs; its inner activations are recomputed, one call
at a time, when backward reaches it. The cost is one more forward of the backbone per
segment (about a quarter to a third more time per training step); the result is the same
function, and the same gradients up to float rounding (tested).

torchtune's ``enable_activation_checkpointing`` wraps each decoder *layer* instead; both
trade the same recompute, but the per-segment form saves one tensor per segment rather than
one per layer and segment, and covers the loss head. Use one of them, not both.
"""

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; when ``enabled`` and autograd is recording, through
    ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved so dropout, e.g. LoRA's,
    draws the same mask when recomputed). Under ``no_grad``/``inference_mode`` there is
    nothing to save, so ``fn`` runs as it is."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
