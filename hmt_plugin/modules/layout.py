"""Attention masks and positions for right-padded rows.

Documents in a batch have different lengths, and a row's segment may hold fewer tokens
than the widest row's, while the memory embedding still closes it. Every row keeps its
slots in reading order; a slot is either real or padding. Real slots attend causally to
real slots only, and take RoPE positions 0, 1, 2, ... counting real slots only, so a row
gives the same result as it would alone, without padding.
"""

from typing import List, Optional, Sequence, Tuple

import torch


def slots_real(
    counts: Sequence[Sequence[int]], widths: Sequence[int], device: torch.device
) -> torch.Tensor:
    """Bool ``[b, sum(widths)]`` for a row layout made of consecutive blocks.

    Args:
        counts: per row, how many leading slots of each block are real.
        widths: width of each block.
        device: where to build the result.
    """
    parts = []
    counts_t = torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True)
    for i, width in enumerate(widths):
        ar = torch.arange(width, device=device)
        parts.append(ar[None, :] < counts_t[:, i : i + 1])
    return torch.cat(parts, dim=1)


def mask_and_positions(real: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """From ``[b, s]`` bool real-slot flags, the ``[b, s, s]`` bool attention mask (True =
    attend) and ``[b, s]`` RoPE positions. Padding slots attend to themselves (so nothing
    is all-masked) and are never attended to."""
    s = real.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=real.device).tril()
    mask = causal[None] & real[:, None, :]
    mask |= torch.eye(s, dtype=torch.bool, device=real.device)[None]
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    return mask, positions


def ragged_layout(
    counts: List[List[int]], widths: List[int], device: torch.device
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Mask and positions for a block layout, or ``(None, None)`` when every slot of every
    row is real (then the decoder's plain causal attention is exact and fastest)."""
    if all(c == w for row in counts for c, w in zip(row, widths)):
        return None, None
    return mask_and_positions(slots_real(counts, widths, device))
