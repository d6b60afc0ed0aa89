"""Score documents with an HMT model in one or several modes: perplexity and answer accuracy."""

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch.utils.data import DataLoader
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from hmt_plugin.modules.hmt import HMT


@dataclass
class ModeScore:
    """Scores of one mode over a set of documents.

    Attributes:
        mode: the HMT mode.
        nll: mean next-token NLL over the scored targets.
        ppl: ``exp(nll)``.
        accuracy: greedy next-token accuracy over the scored targets of each document's last
            segment (the answer of a recall task sits there).
        exact_match: fraction of documents whose scored last-segment targets are all right.
        tokens: number of scored targets.
        documents: number of documents.
    """

    mode: str
    nll: float
    ppl: float
    accuracy: float
    exact_match: float
    tokens: int
    documents: int

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def score_mode(
    model: HMT,
    documents: Any,
    *,
    mode: Optional[str] = None,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    pad_id: int = 0,
    device: Optional[torch.device] = None,
    keep_tokens_per_segment: bool = True,
) -> ModeScore:
    """Read every document whole (up to ``max_tokens``) in ``mode`` (default: the model's
    own) and score it. By default ``mode`` reads as many new tokens per segment as the
    model's own mode, so modes compared on the same documents see the same segments (see
    :meth:`HMT.set_mode`). The model's mode is restored afterwards."""
    from hmt_plugin.data import SegmentWindows, segment_collate

    device = device or next(model.parameters()).device
    original = model.config
    if mode is not None:
        model.set_mode(mode, keep_tokens_per_segment=keep_tokens_per_segment)
    was_training = model.training
    model.eval()
    try:
        block = model.config.tokens_per_segment
        windows = SegmentWindows(documents, tokens_per_segment=block, max_tokens=max_tokens)
        loader = DataLoader(
            windows,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=partial(segment_collate, tokens_per_segment=block, pad_id=pad_id),
        )
        nll_sum, count, correct, answered, exact, docs = 0.0, 0, 0, 0, 0, 0
        for batch in loader:
            tokens = batch["tokens"].to(device)
            labels = batch["labels"].to(device)
            seq_lens = batch["seq_lens"].tolist()
            out = model(tokens, seq_lens=seq_lens, labels=labels, logits=1)
            scored = labels != CROSS_ENTROPY_IGNORE_IDX
            scored[:, 0] = False
            nll_sum += float(out.nll[scored].sum())
            count += int(scored.sum())
            # Logits of the last segment column block; the prediction for target j is at j-1.
            start = out.logits_start
            pred = out.logits.argmax(-1)  # [b, kept]
            for b, length in enumerate(seq_lens):
                lo = max(1, start + 1, ((length - 1) // block) * block)
                targets = labels[b, lo:length]
                mask = targets != CROSS_ENTROPY_IGNORE_IDX
                guesses = pred[b, lo - 1 - start : length - 1 - start]
                hits = (guesses == targets) & mask
                correct += int(hits.sum())
                answered += int(mask.sum())
                if mask.any():
                    exact += int(bool(hits.sum() == mask.sum()))
                docs += 1
        nll = nll_sum / max(count, 1)
        return ModeScore(
            mode=model.config.mode,
            nll=nll,
            ppl=float(torch.tensor(nll).exp()),
            accuracy=correct / max(answered, 1),
            exact_match=exact / max(docs, 1),
            tokens=count,
            documents=docs,
        )
    finally:
        model.config = original
        model.train(was_training)


def format_table(scores: Iterable[ModeScore]) -> str:
    """A small fixed-width table of mode scores."""
    rows = [f"{'mode':<12} {'ppl':>10} {'accuracy':>9} {'exact':>7} {'tokens':>8}"]
    for s in scores:
        rows.append(
            f"{s.mode:<12} {s.ppl:>10.3f} {s.accuracy:>9.3f} {s.exact_match:>7.3f} {s.tokens:>8d}"
        )
    return "\n".join(rows)


def available_modes(model: HMT, modes: List[str]) -> List[str]:
    """The requested modes this model's parameters can run."""
    have_recall = hasattr(model, "recall")
    have_memory = hasattr(model, "initial_memory")
    ok = []
    for mode in modes:
        if mode == "hmt" and not have_recall:
            continue
        if mode in ("rmt", "hmt_stage1") and not have_memory:
            continue
        ok.append(mode)
    return ok
