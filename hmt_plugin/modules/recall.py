"""Memory search: a segment summary queries the cache of past memory embeddings."""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


def recall_scale(dim: int, hidden_dim: int, score_scale: str) -> float:
    """Divisor of the query-key scores.

    ``"published"`` reproduces the published training code: ``hidden_dim`` when both the model
    dim and ``hidden_dim`` are at least 4096 (Llama 2 7B with its default d_h), else
    ``sqrt(hidden_dim)``. (Its generation path always uses ``sqrt``; we use the training rule
    everywhere so a model reads the same way it was trained.)

    ``"cosine"`` is not the published function: :class:`MemoryRecall` then scores unit-length
    queries and keys, ``sqrt(hidden_dim) * cos(q, k)``. Hidden states of large norm (a memory
    of norm ~50) make the dot-product scores so large that the softmax is a hard argmax with
    no gradient; cosine scores keep their differences, and so the softmax, bounded.
    """
    if score_scale == "sqrt":
        return math.sqrt(hidden_dim)
    if score_scale == "linear":
        return float(hidden_dim)
    if score_scale == "cosine":
        # Unit query and keys: scores are sqrt(d_h) * cos, bounded whatever the vectors' norms.
        return 1.0 / math.sqrt(hidden_dim)
    if score_scale == "published":
        return float(hidden_dim) if dim >= 4096 and hidden_dim >= 4096 else math.sqrt(hidden_dim)
    raise ValueError(f"score_scale={score_scale!r}: use 'sqrt', 'linear', 'published' or 'cosine'.")


def recall_torch_dtype(recall_dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``HMTConfig.recall_dtype`` as a torch dtype (None: the model's dtype)."""
    if recall_dtype is None or isinstance(recall_dtype, torch.dtype):
        return recall_dtype
    value = getattr(torch, str(recall_dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"recall_dtype={recall_dtype!r}: use null (the model's dtype), 'bfloat16', "
            "'float16' or 'float32'."
        )
    return value


class MemoryRecall(nn.Module):
    """Single-head cross-attention from segment summaries to cached memory embeddings.

    Queries and keys are projections of width ``hidden_dim`` (no bias); the values are
    the cached memory embeddings themselves, so the recalled memory stays in the
    backbone's embedding space.

    Args:
        dim (int): embedding dim of the backbone.
        hidden_dim (int): d_h, width of the query/key projections.
        score_scale (str): see :func:`recall_scale`.
        recall_dtype (Optional): None computes in the parameters' dtype (the scores in
            float32). A dtype (``"bfloat16"``) runs the recall as the published code does:
            projections, the query, the cached memories and the scores in that dtype, the
            softmax in float32 and cast back, so P_n comes out in that dtype. The parameters
            keep the model's dtype (a published bf16 checkpoint converts to it exactly); they
            are rounded to ``recall_dtype`` where they are used.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        score_scale: str = "sqrt",
        recall_dtype: Union[None, str, torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.k_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.scale = recall_scale(dim, hidden_dim, score_scale)
        self.unit_vectors = score_scale == "cosine"
        self.compute_dtype = recall_torch_dtype(recall_dtype)

    def _project(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None:
            out = proj(x.to(proj.weight.dtype))
        else:
            out = F.linear(x.to(self.compute_dtype), proj.weight.to(self.compute_dtype))
        return F.normalize(out, dim=-1) if self.unit_vectors else out

    def keys(self, memories: torch.Tensor) -> torch.Tensor:
        """``[b, c, d]`` memory embeddings -> ``[b, c, d_h]`` keys. Computed once per memory,
        when it enters the cache, not at every later recall."""
        return self._project(self.k_proj, memories)

    def remember(
        self,
        memory: torch.Tensor,
        cache: Optional[torch.Tensor],
        keys: Optional[torch.Tensor],
        valid: Optional[torch.Tensor],
        cache_size: int,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Append the new memory ``[b, m, d]`` (and its key) to the cache, keeping the newest
        ``cache_size`` vectors. Returns the new ``(cache, keys, valid)``."""
        new_keys = self.keys(memory)
        if cache is None:
            cache, keys = memory, new_keys
        else:
            cache = torch.cat([cache, memory], dim=1)
            keys = torch.cat([keys, new_keys], dim=1)
            if valid is not None:
                valid = F.pad(valid, (0, memory.shape[1]), value=True)
        if cache.shape[1] > cache_size:
            cache, keys = cache[:, -cache_size:], keys[:, -cache_size:]
            valid = valid[:, -cache_size:] if valid is not None else None
        return cache, keys, valid

    def forward(
        self,
        summary: torch.Tensor,
        values: torch.Tensor,
        keys: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            summary (torch.Tensor): ``[b, m, d]`` segment summaries S_n (the queries).
            values (torch.Tensor): ``[b, c, d]`` cached memory embeddings, oldest first.
            keys (torch.Tensor): ``[b, c, d_h]`` their keys (:meth:`keys`).
            valid (Optional[torch.Tensor]): ``[b, c]`` bool, False for empty cache slots of
                rows that have seen fewer segments; None when every slot is filled.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: the recalled memory P_n ``[b, m, d]`` (dtype of
            ``values``, or ``recall_dtype``) and the softmax scores ``[b, m, c]`` (float32;
            with ``recall_dtype``, the rounded weights that were applied).
        """
        query = self._project(self.q_proj, summary)
        scores = torch.matmul(query, keys.transpose(1, 2))
        if self.compute_dtype is None:
            scores = scores.float() / self.scale
        else:
            # The published code divides before it leaves bfloat16; the rounding matters.
            scores = (scores / self.scale).float()
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        weights = F.softmax(scores, dim=-1)
        if self.compute_dtype is None:
            return torch.matmul(weights.to(values.dtype), values), weights
        weights = weights.to(self.compute_dtype)
        recalled = torch.matmul(weights, values.to(self.compute_dtype))
        return recalled, weights.float()
