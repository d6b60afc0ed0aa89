"""Choosing the next token from logits: greedy, temperature and top-k sampling."""

from typing import Optional

import torch


def check_sampling_args(temperature: float, top_k: Optional[int]) -> None:
    """Raise ``ValueError`` naming the bad argument."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 means greedy).")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None (no top-k cut).")


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits (torch.Tensor): ``[b, v]`` next-token logits.
        temperature (float): 0 for greedy (argmax); otherwise logits are divided by it and a
            token is drawn from the softmax.
        top_k (Optional[int]): draw only among the ``top_k`` most likely tokens (``top_k=1`` is
            greedy whatever the temperature).
        generator (Optional[torch.Generator]): random source for reproducible draws (on the
            logits' device).

    Returns:
        torch.Tensor: ``[b]`` int64 token ids, on the logits' device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
