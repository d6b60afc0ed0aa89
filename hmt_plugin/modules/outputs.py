"""What an :class:`~hmt_plugin.modules.HMT` call returns, and the output heads that compute
it segment by segment (logits where asked, next-token NLL without a graph where no loss
needs one)."""

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules import TransformerDecoder

from hmt_plugin.modules.backbone import project
from hmt_plugin.modules.hmt_config import HMTConfig
from hmt_plugin.modules.segment_checkpoint import maybe_checkpoint
from hmt_plugin.modules.state import HMTState
from hmt_plugin.modules.streaming import StreamRows

LogitsPolicy = Union[str, int]


@dataclass
class HMTOutput:
    """What one :class:`HMT` call returns.

    Attributes:
        logits (Optional[torch.Tensor]): ``[b, t_k, v]`` float32 logits of the input positions
            ``logits_start .. t-1`` (all of them, the last ``k`` segments', or None, as asked).
        logits_start (int): input position of ``logits[:, 0]``.
        nll (Optional[torch.Tensor]): ``[b, t]`` float32, ``-log p(labels[:, j] | everything
            before j)`` where labels are given and not ignored, else 0. Position 0 of a
            continued document is predicted from the previous call's last token.
        memories (Optional[torch.Tensor]): ``[b, s, m, d]`` memory embedding M_n written by
            each segment of this call (None in ``baseline`` mode).
        summaries (Optional[torch.Tensor]): ``[b, s, m, d]`` segment summaries S_n, the recall
            queries (``hmt`` mode only).
        recall_scores (Optional[torch.Tensor]): ``[b, s, m, cache_size]`` float32 recall
            weights, right-aligned: index ``-j`` is the memory written ``j`` memory vectors
            before the segment (``hmt`` mode; zeros where nothing was recalled).
        state (HMTState): pass to the next call to continue the same documents.
    """

    logits: Optional[torch.Tensor]
    logits_start: int
    nll: Optional[torch.Tensor]
    memories: Optional[torch.Tensor]
    summaries: Optional[torch.Tensor]
    recall_scores: Optional[torch.Tensor]
    state: HMTState

    def recall_distance(self, num_memory_tokens: int = 1) -> Optional[torch.Tensor]:
        """``[b, s]`` how many segments back each segment's strongest recall looks (the
        paper's Figure 11, the published code's "hist"); -1 where nothing was recalled."""
        if self.recall_scores is None:
            return None
        scores = self.recall_scores[:, :, 0]
        n = scores.shape[-1]
        vectors_back = n - scores.argmax(dim=-1)
        segments_back = (vectors_back + num_memory_tokens - 1) // num_memory_tokens
        return torch.where(scores.sum(-1) > 0, segments_back, torch.full_like(segments_back, -1))


class SegmentOutputs:
    """Logits and next-token NLL of one call's positions, gathered segment by segment.

    Args:
        decoder (TransformerDecoder): the backbone (its final norm and output projection).
        rows (StreamRows): what the call reads.
        logits_policy: ``"all"``, ``"none"`` or k (see :meth:`HMT.forward`).
        loss_scope (str): ``"all"`` or ``"last"``.
        all_outputs (bool): NLL of every target (``outputs="all"``), or only where a loss
            needs it.
        checkpoint (bool): recompute the loss head in backward.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        rows: StreamRows,
        *,
        logits_policy: LogitsPolicy,
        loss_scope: str,
        all_outputs: bool,
        checkpoint: bool,
    ) -> None:
        self.decoder = decoder
        self.rows = rows
        self.targets = rows.targets
        self.logits_policy = logits_policy
        self.loss_scope = loss_scope
        self.all_outputs = all_outputs
        self.checkpoint = checkpoint
        self.logits: List[torch.Tensor] = []
        self.nll: List[torch.Tensor] = []
        self.nll_first: Optional[torch.Tensor] = None

    def first_target(self, last_hidden: Optional[torch.Tensor], state_in: HMTState) -> None:
        """NLL of each row's first target, predicted by the previous call's last token
        (``last_hidden`` ``[b, 1, d]``; 0 for documents that start here)."""
        if self.targets is None:
            return
        b, device = self.rows.batch, self.targets.device
        if last_hidden is None:
            self.nll_first = torch.zeros(b, 1, device=device)
            return
        continued = torch.tensor([s > 0 for s in state_in.segments_seen], device=device)[:, None]
        first = self.targets[:, :1].masked_fill(~continued, CROSS_ENTROPY_IGNORE_IDX)
        self.nll_first = _nll(project(self.decoder, last_hidden), first)

    def _kept(self, n: int) -> bool:
        policy = self.logits_policy
        if policy == "all":
            return True
        if policy == "none":
            return False
        return n >= self.rows.n_segments - policy

    def reads_from(self, n: int, w: int) -> int:
        """The first of segment n's ``w`` positions whose hidden state :meth:`add` reads (``w``:
        none). Positions before it get NLL 0 (only with ``all_outputs`` off)."""
        if self._kept(n) or (self.targets is not None and self.all_outputs):
            return 0
        return w if self.targets is None else self._loss_from(n, w)

    def _loss_from(self, n: int, w: int) -> int:
        """Positions ``loss_from..`` of segment n predict a target of the loss (a row's last
        segment starts at n or n+1: the last position of segment n predicts the first target
        of n+1)."""
        if self.loss_scope == "all":
            return 0
        loss_from = w
        for last in self.rows.last_segments():
            if last == n:
                return 0
            if last == n + 1:
                loss_from = w - 1
        return loss_from

    def add(self, n: int, token_hidden: torch.Tensor, w: Optional[int] = None) -> None:
        """Logits (if kept) and next-token NLL of segment n's hidden states, without building
        a graph for positions no loss needs.

        Args:
            n (int): the segment.
            token_hidden (torch.Tensor): ``[b, w - j, d]`` hidden states of its positions
                ``j..w-1``, where ``j <= reads_from(n, w)``.
            w (Optional[int]): the segment's width (None: ``token_hidden``'s, j = 0).
        """
        w = token_hidden.shape[1] if w is None else w
        skipped = w - token_hidden.shape[1]
        keep = self._kept(n)
        if not keep and self.targets is None:
            return
        assert skipped <= self.reads_from(n, w), "add() needs positions that were not computed"
        start = n * self.rows.block
        targets = None
        if self.targets is not None:
            nxt = self.targets[:, start + 1 : start + w + 1]
            targets = F.pad(nxt, (0, w - nxt.shape[1]), value=CROSS_ENTROPY_IGNORE_IDX)
        if keep:
            logits = project(self.decoder, token_hidden)
            self.logits.append(logits)
            if targets is not None:
                self.nll.append(_nll(logits, targets))
            return
        loss_from = self._loss_from(n, w)
        parts = []
        if loss_from > 0:
            if self.all_outputs:
                with torch.no_grad():  # for logging only: no graph
                    parts.append(_nll(project(self.decoder, token_hidden[:, :loss_from]), targets[:, :loss_from]))
            else:
                parts.append(token_hidden.new_zeros(self.rows.batch, loss_from, dtype=torch.float32))
        if loss_from < w:
            parts.append(
                maybe_checkpoint(self.checkpoint, _projected_nll, self.decoder,
                                 token_hidden[:, loss_from - skipped :], targets[:, loss_from:])
            )
        self.nll.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def result(
        self,
        config: HMTConfig,
        memories: List[torch.Tensor],
        scores: List[Optional[torch.Tensor]],
        summaries: Optional[torch.Tensor],
        state: HMTState,
    ) -> HMTOutput:
        """The call's :class:`HMTOutput`, in the caller's coordinates.

        Args:
            config (HMTConfig): the model's settings.
            memories: per segment, M_n ``[b, m, d]``.
            scores: per segment, the recall weights ``[b, m, c]`` (None: nothing recalled).
            summaries (Optional[torch.Tensor]): ``[b, s, m, d]``.
            state (HMTState): the outgoing state.
        """
        rows = self.rows
        mem = torch.stack(memories, dim=1) if memories else None
        rec = None
        if config.uses_recall and memories:
            n_slots = config.cache_size
            padded = []
            for s in scores:
                if s is None:
                    padded.append(torch.zeros(
                        rows.batch, config.num_memory_tokens, n_slots, device=rows.tokens.device
                    ))
                else:
                    padded.append(F.pad(s, (n_slots - s.shape[-1], 0)))
            rec = torch.stack(padded, dim=1)
        logits, logits_start = None, rows.new_width
        if self.logits:
            combined = torch.cat(self.logits, dim=1)
            first_kept = rows.width - combined.shape[1]
            logits, logits_start = rows.to_input_coords(combined, first_kept)
        nll = None
        if self.nll_first is not None:
            # Position j's target is predicted at position j-1: shift predictions onto targets.
            pred = torch.cat([self.nll_first, *self.nll], dim=1)[:, : rows.width]
            nll, _ = rows.to_input_coords(pred, 0)
        return HMTOutput(
            logits=logits,
            logits_start=logits_start,
            nll=nll,
            memories=mem,
            summaries=summaries,
            recall_scores=rec,
            state=state,
        )


def _projected_nll(decoder: TransformerDecoder, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[b, w, d]`` hidden states before the final norm -> ``[b, w]`` NLL of ``targets``."""
    return _nll(project(decoder, hidden), targets)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[b, w, v]`` logits and ``[b, w]`` targets -> ``[b, w]`` float32 NLL (0 where ignored)."""
    b, w = targets.shape
    if w == 0:
        return logits.new_zeros(b, 0, dtype=torch.float32)
    loss = F.cross_entropy(
        logits.reshape(b * w, -1).float(),
        targets.reshape(-1).long(),
        ignore_index=CROSS_ENTROPY_IGNORE_IDX,
        reduction="none",
    )
    return loss.view(b, w)
