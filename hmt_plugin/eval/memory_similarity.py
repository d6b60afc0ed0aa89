"""How alike the memories an HMT writes are: do they carry their segment, or one vector?

A written memory is a final-norm hidden state, and the final-norm hidden states of a pretrained
decoder share one large direction (on SmolLM2-135M the quality benchmark measured a mean cosine
of 0.95 between any two memories). A direction every memory has cannot tell segments apart, so
:func:`memory_similarity` also compares the memories after subtracting their mean: a memory
that carries its document is then closer to the other memories of its own document than to
those of other documents, and one that carries its segment is closest to its neighbours.
"""

from typing import Dict

import torch
import torch.nn.functional as F


def _mean_cosine(vectors: torch.Tensor, pairs: torch.Tensor) -> float:
    unit = F.normalize(vectors, dim=-1)
    return (unit @ unit.T)[pairs].mean().item()


def memory_similarity(memories: torch.Tensor) -> Dict[str, float]:
    """Cosine similarities between the memories written over a batch of documents.

    Centring on the mean of the memories given makes the centred vectors sum to zero, so when
    the ``n`` centred memories are of equal length their mean cosine over all pairs is
    ``-1 / (n - 1)``: compare the centred figures with one another, not with zero.

    Args:
        memories (torch.Tensor): ``[b, s, m, d]`` (as in :class:`~hmt_plugin.modules.HMTOutput`)
            or ``[b, s, d]``: the memories written over ``b >= 2`` documents of ``s >= 2``
            segments; the ``m`` memory tokens of a segment are read as one vector.

    Returns:
        Dict[str, float]: mean cosine over pairs of distinct memories: ``raw`` (all pairs, as
        written); after centring on the mean memory, ``centred_neighbours`` (consecutive
        segments of one document), ``centred_same_document`` (any two segments of one
        document) and ``centred_across_documents`` (segments of different documents); and
        ``shared_fraction``, the squared length of the mean memory over the mean squared
        length of a memory (1.0: every memory is the same vector).

    Raises:
        ValueError: if ``memories`` is not 3- or 4-dimensional, or has fewer than 2 documents
            or 2 segments.
    """
    if memories.dim() not in (3, 4):
        raise ValueError(
            f"memories must be [b, s, m, d] or [b, s, d]; got shape {tuple(memories.shape)}."
        )
    b, s = memories.shape[:2]
    if b < 2 or s < 2:
        raise ValueError(
            f"memories needs at least 2 documents and 2 segments to compare within and across "
            f"documents; got {b} document(s) of {s} segment(s). Read more or longer pieces."
        )
    flat = memories.detach().float().reshape(b * s, -1)
    document = torch.arange(b).repeat_interleave(s)
    segment = torch.arange(s).repeat(b)
    same_document = document[:, None] == document[None, :]
    distinct = ~torch.eye(b * s, dtype=torch.bool)
    neighbours = same_document & ((segment[:, None] - segment[None, :]).abs() == 1)
    mean = flat.mean(dim=0)
    centred = flat - mean
    return {
        "raw": _mean_cosine(flat, distinct),
        "centred_neighbours": _mean_cosine(centred, neighbours),
        "centred_same_document": _mean_cosine(centred, same_document & distinct),
        "centred_across_documents": _mean_cosine(centred, ~same_document),
        "shared_fraction": (mean.pow(2).sum() / flat.pow(2).sum(dim=-1).mean()).item(),
    }
