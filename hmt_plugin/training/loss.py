"""Training loss over segments: every segment, or the last one only (the published code's)."""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

LOSS_SCOPES = ("last", "all")


@dataclass
class SegmentLoss:
    """Sums over one batch, ready for gradient accumulation and for logging both PPLs.

    Attributes:
        loss_sum (torch.Tensor): summed NLL over the targets of ``scope`` (with graph).
        num_tokens (torch.Tensor): number of those targets.
        last_sum / last_tokens: summed NLL and count over each row's last segment (no graph).
        all_sum / all_tokens: the same over every segment (no graph); ``all_sum`` is None when
            the NLL outside the loss was not computed (``log_all_segments=False``).
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    last_sum: torch.Tensor
    last_tokens: torch.Tensor
    all_sum: Optional[torch.Tensor]
    all_tokens: torch.Tensor


def last_segment_mask(
    seq_lens: Sequence[int], width: int, tokens_per_segment: int, device: torch.device
) -> torch.Tensor:
    """``[b, width]`` bool: the positions of each row's last (possibly partial) segment."""
    lens = torch.as_tensor(list(seq_lens), device=device)
    start = ((lens - 1).clamp(min=0) // tokens_per_segment) * tokens_per_segment
    pos = torch.arange(width, device=device)[None, :]
    return (pos >= start[:, None]) & (pos < lens[:, None])


def segment_loss(
    nll: torch.Tensor,
    labels: torch.Tensor,
    seq_lens: Sequence[int],
    tokens_per_segment: int,
    scope: str,
    all_segments: bool = True,
) -> SegmentLoss:
    """Reduce HMT's per-token NLL to the training loss of ``scope`` and both logging PPLs.

    Args:
        nll (torch.Tensor): ``[b, t]`` from :class:`~hmt_plugin.modules.HMTOutput`.
        labels (torch.Tensor): ``[b, t]`` targets (``CROSS_ENTROPY_IGNORE_IDX`` = not scored).
        seq_lens: real tokens per row.
        tokens_per_segment (int): the model's segment size in new tokens.
        scope (str): ``"last"`` (targets in each row's last segment) or ``"all"``.
        all_segments (bool): ``nll`` holds every target's NLL (False: only the loss targets',
            as ``HMT.forward(..., outputs="loss")`` gives; ``all_sum`` is then None).
    """
    if scope not in LOSS_SCOPES:
        raise ValueError(f"loss_scope={scope!r}: use one of {LOSS_SCOPES}.")
    scored = labels != CROSS_ENTROPY_IGNORE_IDX
    scored[:, 0] = False  # the first token of a window has no prediction
    last = scored & last_segment_mask(seq_lens, labels.shape[1], tokens_per_segment, labels.device)
    chosen = last if scope == "last" else scored
    zero = nll.new_zeros(())
    detached = nll.detach()
    return SegmentLoss(
        loss_sum=torch.where(chosen, nll, zero).sum(),
        num_tokens=chosen.sum(),
        last_sum=torch.where(last, detached, zero).sum(),
        last_tokens=last.sum(),
        all_sum=torch.where(scored, detached, zero).sum() if all_segments or scope == "all" else None,
        all_tokens=scored.sum(),
    )


def batch_loss(
    model: torch.nn.Module,
    batch: Dict[str, torch.Tensor],
    device: torch.device,
    scope: str,
    *,
    log_all_segments: bool = True,
    checkpoint_segments: bool = False,
) -> SegmentLoss:
    """Read one collated batch (``segment_collate``'s layout) with HMT and reduce it: the
    recipes' loss step. No logits are kept: the model computes the NLL segment by segment.

    Args:
        log_all_segments (bool): with ``scope="last"``, also compute the NLL of the earlier
            segments, which only the logged ``ppl_all_segments`` reads (False skips their
            output projection, and the unused summary of each document's first segment: the
            same loss and gradients, faster, and no all-segment PPL).
        checkpoint_segments (bool): recompute each backbone call in backward (see
            :mod:`hmt_plugin.modules.segment_checkpoint`).
    """
    seq_lens = batch["seq_lens"].tolist()
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    out = model(
        tokens, seq_lens=seq_lens, labels=labels, logits="none", loss_scope=scope,
        outputs="all" if log_all_segments else "loss", checkpoint_segments=checkpoint_segments,
    )
    return segment_loss(out.nll, labels, seq_lens, model.config.tokens_per_segment, scope,
                        all_segments=log_all_segments)


@dataclass(frozen=True)
class LossOptions:
    """How the recipes compute a step's loss (config keys ``log_all_segments`` and
    ``segment_checkpointing``).

    Attributes:
        log_all_segments (bool): log ``ppl_all_segments``. Its NLL outside the loss (the
            earlier segments with ``loss_scope: last``) is computed only on the optimizer
            steps that are logged; False never computes it.
        checkpoint_segments (bool): recompute each backbone call in backward.
        log_every_n_steps (int): which steps are logged.
    """

    log_all_segments: bool = True
    checkpoint_segments: bool = False
    log_every_n_steps: int = 1

    def for_step(self, step: int) -> Dict[str, bool]:
        """``batch_loss`` options for the micro-batches of optimizer step ``step`` (1-based)."""
        logged = step % max(1, self.log_every_n_steps) == 0
        return {"log_all_segments": self.log_all_segments and logged,
                "checkpoint_segments": self.checkpoint_segments}


class LossAccumulator:
    """Sums of :class:`SegmentLoss` over the micro-batches of one optimizer step (and, after
    :meth:`all_reduce`, over the ranks), so the loss is normalised by the step's total number
    of targets exactly as one big batch would be."""

    def __init__(self) -> None:
        self._sums = None

    def add(self, loss: SegmentLoss) -> None:
        values = torch.stack(
            [
                loss.loss_sum.detach().float(),
                loss.num_tokens.float(),
                loss.last_sum.float(),
                loss.last_tokens.float(),
                loss.all_sum.float() if loss.all_sum is not None else torch.full_like(loss.last_sum.float(), math.nan),
                loss.all_tokens.float(),
            ]
        )
        self._sums = values if self._sums is None else self._sums + values

    def all_reduce(self) -> None:
        torch.distributed.all_reduce(self._sums)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self._sums[1]

    def metrics(self, elapsed: float, world_size: int = 1) -> Dict[str, float]:
        """One host sync: the step's loss, both perplexities and throughput
        (``ppl_all_segments`` only where the earlier segments' NLL was computed)."""
        loss, tokens, last, last_n, every, every_n = self._sums.tolist()
        out = {
            "loss": loss / max(tokens, 1.0),
            "ppl_last_segment": math.exp(min(last / max(last_n, 1.0), 50.0)),
            "ppl_all_segments": math.exp(min(every / max(every_n, 1.0), 50.0)),
            "tokens_per_second_per_rank": every_n / max(elapsed, 1e-9) / world_size,
        }
        if math.isnan(every):
            del out["ppl_all_segments"]
        return out
