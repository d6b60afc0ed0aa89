"""Per-segment activation checkpointing for HMT's training read.

A training window of D segments backpropagates through all D backbone calls (that is what
BPTT buys), so without checkpointing the activations of every segment stay alive until the
backward pass: activation memory grows linearly with ``bptt_depth``. With
``HMT.forward(..., checkpoint_segments=True)`` each backbone call (the batched
representation pass, each segment's recall pass, and the loss head of a segment that carries
gradient) keeps only its inputs and outputs; its inner activations are recomputed, one call
at a time, when backward reaches it (the representation pass, batched over all segments,
is recomputed one segment's rows at a time). Activation memory then grows by a few vectors
per segment instead of every layer's activations. The cost is one more forward of the
backbone per segment (about 40% more time per training step on config S, CPU); the result
is the same function, and the same gradients up to float rounding (tested).

torchtune's ``enable_activation_checkpointing`` wraps each decoder *layer* instead; both
trade the same recompute, but the per-segment form saves one tensor per segment rather than
one per layer and segment, and covers the loss head. Use one of them, not both.
"""

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; when ``enabled`` and autograd is recording, through
    ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved so dropout, e.g. LoRA's,
    draws the same mask when recomputed). Under ``no_grad``/``inference_mode`` there is
    nothing to save, so ``fn`` runs as it is."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def maybe_checkpoint_rows(
    enabled: bool,
    rows_per_call: int,
    fn: Callable[..., torch.Tensor],
    decoder: Any,
    x: torch.Tensor,
    *,
    mask: Optional[torch.Tensor],
    input_pos: Optional[torch.Tensor],
) -> torch.Tensor:
    """``fn(decoder, x, mask=mask, input_pos=input_pos)`` over a batch of independent rows
    (``[rows, s, d]``, with ``[rows, s, s]`` mask and ``[rows, s]`` positions or None). When
    checkpointing, in chunks of ``rows_per_call`` rows, each checkpointed on its own: backward
    then recomputes one chunk's activations at a time, so the batched representation pass of a
    deep window does not bring back every segment's activations at once. Chunks would draw
    dropout masks in another order than one batched call, so a decoder with active dropout
    (e.g. LoRA's, in training) is checkpointed in one call: the default path's masks."""
    if (not (enabled and torch.is_grad_enabled()) or x.shape[0] <= rows_per_call
            or _has_active_dropout(decoder)):
        return maybe_checkpoint(enabled, fn, decoder, x, mask=mask, input_pos=input_pos)
    parts = []
    for lo in range(0, x.shape[0], rows_per_call):
        rows = slice(lo, lo + rows_per_call)
        parts.append(checkpoint(
            fn, decoder, x[rows], use_reentrant=False,
            mask=None if mask is None else mask[rows],
            input_pos=None if input_pos is None else input_pos[rows],
        ))
    return torch.cat(parts)


def _has_active_dropout(module: nn.Module) -> bool:
    return module.training and any(
        isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules()
    )
