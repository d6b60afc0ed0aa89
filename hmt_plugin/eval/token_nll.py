"""Per-token negative log-likelihood of equal-length pieces of text, read in different ways,
so that readers can be compared on exactly the same scored positions.

Every reader returns a ``[pieces, length]`` float64 array: entry ``[i, j]`` is
``-log p(piece_i[j] | what the reader saw before j)``, and column 0 (no context at all) is NaN
in every reader. The readers:

* :func:`hmt_token_nll`: an :class:`~hmt_plugin.modules.HMT` in any mode (``baseline`` is the
  backbone on disjoint segments), streamed in calls of ``chunk_segments`` segments;
* :func:`window_token_nll`: the bare backbone on a sliding window of ``window`` tokens moving
  by ``stride`` (``window`` equal to the piece length: full attention over the piece).

:func:`band_scores` turns such arrays into perplexities over position bands, with a standard
error that treats each (piece, segment) block, not each token, as one sample.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hmt_plugin.modules.backbone import embed_tokens, project, run_layers
from hmt_plugin.modules.hmt import HMT


def _stack(pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    lengths = {len(p) for p in pieces}
    if not pieces or len(lengths) != 1:
        raise ValueError(
            f"pieces must be a non-empty list of equal-length token sequences; got lengths "
            f"{sorted(lengths)}. Cut them to one length first."
        )
    if min(lengths) < 2:
        raise ValueError("pieces need at least 2 tokens (one of context, one target).")
    return torch.as_tensor(np.asarray(pieces, dtype=np.int64))


@torch.inference_mode()
def hmt_token_nll(
    model: HMT,
    pieces: Sequence[Sequence[int]],
    *,
    batch_size: int = 4,
    chunk_segments: int = 16,
    device: Optional[torch.device] = None,
    recall_distances: Optional[Dict[int, int]] = None,
    carry_memory: bool = True,
    memories: Optional[List[torch.Tensor]] = None,
) -> np.ndarray:
    """``[pieces, length]`` NLL of each token under ``model`` in its current mode.

    Each piece is a fresh document; calls of ``chunk_segments`` segments carry the state, so
    activation memory stays bounded however long the pieces are.

    Args:
        recall_distances: if given (``hmt`` mode), counts of how many segments back each
            segment's strongest recall looked are added to it (``-1``: nothing to recall).
        carry_memory: False is a diagnostic for the carried-memory modes (``rmt``,
            ``hmt_stage1``): every segment gets the learned first-segment memory
            (``initial_memory``) instead of the memory the previous segment wrote, so the
            reader keeps its sensory tokens and its layout but carries nothing. Reads one
            segment per call.
        memories: if given (a memory mode), the memories written while reading are appended
            to it, one ``[rows, segments, m, d]`` tensor per batch of pieces, on the model's
            device: ``torch.cat(memories)`` is ``[pieces, segments, m, d]``.
    """
    tokens = _stack(pieces)
    device = device or next(model.parameters()).device
    n, length = tokens.shape
    if not carry_memory:
        if model.config.mode not in ("rmt", "hmt_stage1"):
            raise ValueError(
                f"carry_memory=False needs a carried-memory mode (rmt, hmt_stage1); the model "
                f"reads in {model.config.mode!r}."
            )
        chunk_segments = 1
    step = chunk_segments * model.config.tokens_per_segment
    out = np.empty((n, length), dtype=np.float64)
    was_training = model.training
    model.eval()
    distances = []
    try:
        for lo in range(0, n, batch_size):
            rows = tokens[lo : lo + batch_size].to(device)
            state, parts, written = None, [], []
            for start in range(0, length, step):
                chunk = rows[:, start : start + step]
                result = model(chunk, labels=chunk, state=state, logits="none")
                state = result.state
                if not carry_memory:
                    state.memory = model.initial_memory.to(state.memory).expand_as(state.memory)
                parts.append(result.nll.float())
                if memories is not None:
                    written.append(result.memories)
                if recall_distances is not None and result.recall_scores is not None:
                    distances.append(result.recall_distance(model.config.num_memory_tokens).flatten())
            # One transfer per batch of pieces, not one per call.
            out[lo : lo + len(rows)] = torch.cat(parts, dim=1).cpu().double().numpy()
            if memories is not None:
                memories.append(torch.cat(written, dim=1))
    finally:
        model.train(was_training)
    if distances:
        values, counts = torch.cat(distances).unique(return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            recall_distances[int(v)] = recall_distances.get(int(v), 0) + int(c)
    out[:, 0] = np.nan
    return out


@torch.inference_mode()
def window_token_nll(
    decoder: torch.nn.Module,
    pieces: Sequence[Sequence[int]],
    *,
    window: int,
    stride: int,
    batch_size: int = 8,
    device: Optional[torch.device] = None,
    max_logit_positions: int = 1024,
) -> np.ndarray:
    """``[pieces, length]`` NLL of each token under the bare backbone reading a sliding window.

    The piece is cut into chunks of ``stride`` tokens; chunk c is scored by one backbone call
    on the ``window`` tokens that end with it (fewer at the start of the piece), so each token
    sees between ``window - stride`` and ``window - 1`` tokens of context. ``window`` at least
    the piece length reads each piece in one call (full attention).

    Args:
        decoder: a decoder prepared by :func:`~hmt_plugin.modules.backbone.drive_decoder`
            (``model.backbone`` of an HMT).
        window (int): tokens per backbone call; more than ``stride``, so that the first token
            of a chunk is predicted from inside the same call.
        stride (int): new tokens per call.
        max_logit_positions (int): logits are formed for at most this many positions of one
            row at a time (the output projection of a long window is the memory peak).
    """
    tokens = _stack(pieces)
    n, length = tokens.shape
    stride = min(stride, length)
    window = min(window, length)
    if window <= stride and stride < length:
        raise ValueError(
            f"window={window} must be larger than stride={stride}: the first token of each "
            "chunk is predicted from the token before it, inside the same window."
        )
    device = device or decoder.tok_embeddings.weight.device
    # Filled on the device and copied to the host once, not once per window.
    out = torch.full((n, length), float("nan"), device=device)
    # Chunk c0..c0+stride is scored by the window that ends with it.
    calls = []
    for c0 in range(0, length, stride):
        end = min(c0 + stride, length)
        calls.append((max(0, end - window), end, max(c0, 1)))
    for start, end, first_target in calls:
        for lo in range(0, n, batch_size):
            ids = tokens[lo : lo + batch_size, start:end].to(device)
            hidden = run_layers(decoder, embed_tokens(decoder, ids))
            # Position p's logits predict token p + 1: targets first_target..end-1.
            a = first_target - 1 - start
            nll = []
            for s in range(a, end - 1 - start, max_logit_positions):
                e = min(s + max_logit_positions, end - 1 - start)
                logits = project(decoder, hidden[:, s:e])
                target = ids[:, s + 1 : e + 1]
                nll.append(
                    F.cross_entropy(
                        logits.flatten(0, 1).float(), target.flatten(), reduction="none"
                    ).view(target.shape)
                )
            out[lo : lo + len(ids), first_target:end] = torch.cat(nll, 1)
    return out.cpu().double().numpy()


@dataclass
class BandScore:
    """Perplexity over one band of positions ``[start, end)`` of every piece.

    Attributes:
        start / end: the band (token positions of the piece).
        tokens: tokens scored.
        nll: mean NLL; ppl = exp(nll).
        nll_se: standard error of ``nll``, from the spread of the per-block means (a block is
            one segment of one piece: neighbouring tokens are not independent samples).
        ppl_low / ppl_high: exp(nll -/+ nll_se).
    """

    start: int
    end: int
    tokens: int
    nll: float
    ppl: float
    nll_se: float
    ppl_low: float
    ppl_high: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def band_scores(
    nll: np.ndarray, bands: Sequence[Sequence[int]], block: int
) -> List[BandScore]:
    """Perplexity of ``nll`` (``[pieces, length]``, NaN where unscored) over each
    ``(start, end)`` band, with a block standard error (``block`` positions per block)."""
    out = []
    for start, end in bands:
        part = nll[:, start:end]
        mask = ~np.isnan(part)
        count = int(mask.sum())
        if count == 0:
            raise ValueError(f"band [{start}, {end}) has no scored token.")
        mean = float(part[mask].mean())
        blocks = []
        for b0 in range(start - start % block, end, block):
            lo, hi = max(b0, start), min(b0 + block, end)
            sub = nll[:, lo:hi]
            ok = ~np.isnan(sub)
            for row, row_ok in zip(sub, ok):
                if row_ok.any():
                    blocks.append((row[row_ok].sum(), row_ok.sum()))
        sums = np.array([b[0] for b in blocks])
        counts = np.array([b[1] for b in blocks], dtype=np.float64)
        # Ratio estimator's standard error over blocks of (nearly) equal size.
        if len(blocks) > 1:
            resid = sums - mean * counts
            se = float(np.sqrt((resid**2).sum() / (len(blocks) - 1) / len(blocks)) / counts.mean())
        else:
            se = float("nan")
        out.append(
            BandScore(
                start=start, end=end, tokens=count, nll=mean, ppl=math.exp(mean), nll_se=se,
                ppl_low=math.exp(mean - se), ppl_high=math.exp(mean + se),
            )
        )
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, block: int) -> Dict[str, float]:
    """Mean NLL of ``b`` minus ``a`` over the positions both score, with the block standard
    error of that difference (the two readers scored the same tokens, so the difference is
    far less noisy than either score)."""
    diff = b - a
    scores = band_scores(diff, [(0, diff.shape[1])], block)[0]
    return {"nll_difference": scores.nll, "nll_difference_se": scores.nll_se,
            "tokens": scores.tokens}
