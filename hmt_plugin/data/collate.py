"""Batching documents for segment recurrence."""

from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def segment_collate(
    batch: Sequence[Mapping[str, Any]],
    *,
    tokens_per_segment: int,
    pad_id: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    extra_keys: Sequence[str] = (),
    min_segments: int = 1,
) -> Dict[str, torch.Tensor]:
    """Right-pad documents of any length to a whole number of segments.

    Use in a recipe as ``functools.partial(segment_collate,
    tokens_per_segment=model.config.tokens_per_segment, pad_id=tokenizer.pad_id)``.

    With ``B`` items, ``L = tokens_per_segment`` and ``S = ceil(max length / L)`` (at least 1):

    * ``tokens``: LongTensor ``[B, S*L]``, padded with ``pad_id`` (0 when ``pad_id`` is
      negative or None, as for SentencePiece's pad=-1; padding is masked anyway);
    * ``labels``: LongTensor ``[B, S*L]``, the item's ``labels`` if it has them, else its
      tokens (unshifted: HMT predicts position j from j-1), ``ignore_idx`` at padding;
    * ``mask``: BoolTensor ``[B, S*L]``, True on each row's real tokens (a prefix);
    * ``seq_lens``: LongTensor ``[B]``, real tokens per row;
    * one LongTensor ``[B]`` per name in ``extra_keys`` (per-item integers such as
      ``"distance"``, ``"doc_id"``, ``"start"``).

    ``min_segments`` pads every batch to at least that many segments. Training recipes set it
    to the window's segment count: under FSDP every rank must call the backbone the same
    number of times per step, so a batch made only of short end-of-document windows must not
    be narrower than its neighbours on other ranks (and fixed shapes suit ``torch.compile``).

    Padding a row never changes the row's results: HMT reads each row's own length.
    """
    if not isinstance(tokens_per_segment, int) or tokens_per_segment < 1:
        raise ValueError(f"tokens_per_segment={tokens_per_segment!r} must be a positive integer.")
    if len(batch) == 0:
        raise ValueError("segment_collate got an empty batch.")
    seqs = [np.asarray(item["tokens"]).reshape(-1) for item in batch]
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    segments = max(1, min_segments, -(-int(lengths.max()) // tokens_per_segment))
    width = segments * tokens_per_segment
    fill = 0 if pad_id is None or pad_id < 0 else int(pad_id)

    tokens = np.full((len(batch), width), fill, dtype=np.int64)
    labels = np.full((len(batch), width), ignore_idx, dtype=np.int64)
    for row, (item, seq) in enumerate(zip(batch, seqs)):
        n = seq.size
        tokens[row, :n] = seq
        target = item.get("labels")
        if target is None:
            labels[row, :n] = seq
        else:
            target = np.asarray(target).reshape(-1)
            if target.size != n:
                raise ValueError(
                    f"batch item {row}: labels have {target.size} entries for {n} tokens."
                )
            labels[row, :n] = target
    mask = np.arange(width)[None, :] < lengths[:, None]
    out = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "mask": torch.from_numpy(mask),
        "seq_lens": torch.from_numpy(lengths),
    }
    for key in extra_keys:
        try:
            values = [int(item[key]) for item in batch]
        except KeyError:
            raise KeyError(f"extra_keys names {key!r}, which batch items lack.") from None
        out[key] = torch.tensor(values, dtype=torch.long)
    return out
