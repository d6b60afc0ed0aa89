"""Streaming bookkeeping of one :class:`~hmt_plugin.modules.HMT` call.

A call may continue documents from an earlier call's :class:`HMTState`, and it may end
anywhere, even inside a segment. HMT never reads a segment in two pieces: the tokens of an
unfinished segment (``state.pending``) are put back in front of the row's new tokens and the
segment is read again, whole, with its continuation. This module keeps the coordinates
straight:

* :func:`merge_pending` builds the rows the model reads (pending tokens first) and plans
  their segments on the host, so no segment step waits for the device;
* :meth:`StreamRows.to_input_coords` maps per-position outputs back onto the caller's
  positions;
* :func:`final_state` assembles the outgoing state per row: the state after the row's last
  complete segment (rows end in different segments), plus its unfinished tail as ``pending``.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from hmt_plugin.modules.state import HMTState


@dataclass
class StreamRows:
    """The rows one call reads, pending tokens included, and their segment plan.

    Attributes:
        tokens (torch.Tensor): ``[b, t']`` token ids, right-padded: each continued row's
            pending tokens, then its new tokens.
        targets (Optional[torch.Tensor]): ``[b, t']`` labels on the same positions,
            ``CROSS_ENTROPY_IGNORE_IDX`` on pending and padding positions.
        lengths (List[int]): per row, real tokens of ``tokens`` (0 for a row without new
            tokens: its state passes through).
        offsets (List[int]): per row, pending tokens in front of the caller's first token.
        active (List[bool]): per row, whether the call gives it new tokens.
        new_width (int): t, the width of the caller's ``tokens``.
        block (int): new tokens per segment (``HMTConfig.tokens_per_segment``).
        width (int): t'.
        n_segments (int): segments of the widest row.
        widths (List[int]): per segment, its width (the last may be partial).
        seg_lens (List[List[int]]): per segment, per row, its real tokens.
    """

    tokens: torch.Tensor
    targets: Optional[torch.Tensor]
    lengths: List[int]
    offsets: List[int]
    active: List[bool]
    new_width: int
    block: int
    width: int = field(init=False)
    n_segments: int = field(init=False)
    widths: List[int] = field(init=False)
    seg_lens: List[List[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.width = self.tokens.shape[1]
        self.n_segments = -(-self.width // self.block) if self.width else 0
        self.widths = [
            min(self.block, self.width - n * self.block) for n in range(self.n_segments)
        ]
        self.seg_lens = [
            [max(0, min(w, length - n * self.block)) for length in self.lengths]
            for n, w in enumerate(self.widths)
        ]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def segment(self, n: int) -> torch.Tensor:
        """``[b, w_n]`` token ids of segment n."""
        start = n * self.block
        return self.tokens[:, start : start + self.widths[n]]

    def last_segments(self) -> List[int]:
        """Per row, the segment holding its last token (-1 for a row without tokens)."""
        return [(length - 1) // self.block if length else -1 for length in self.lengths]

    def snapshot_rows(self) -> Dict[int, List[int]]:
        """Segment after which each row's state is final: its last complete segment (-1: the
        incoming state). A trailing partial segment becomes ``pending`` instead."""
        rows: Dict[int, List[int]] = {}
        for b, (length, active) in enumerate(zip(self.lengths, self.active)):
            at = length // self.block - 1 if active else -1
            rows.setdefault(at, []).append(b)
        return rows

    def to_input_coords(self, values: torch.Tensor, start: int) -> Tuple[torch.Tensor, int]:
        """Map ``[b, w, ...]`` values covering merged positions ``start..`` back onto the
        caller's token positions (the merged rows may begin with pending tokens)."""
        offsets = self.offsets
        if len(set(offsets)) == 1:
            drop = max(0, offsets[0] - start)
            return values[:, drop:], start + drop - offsets[0]
        if start != 0:
            raise ValueError(
                "rows continue unfinished segments of different lengths; ask for logits='all' "
                "or 'none' (or continue calls on segment boundaries)."
            )
        device = values.device
        index = torch.arange(self.new_width, device=device)[None, :] + torch.tensor(
            offsets, device=device
        )[:, None]
        index = index.clamp(max=values.shape[1] - 1)
        if values.dim() == 3:
            index = index[:, :, None].expand(-1, -1, values.shape[-1])
        return values.gather(1, index), 0


def merge_pending(
    tokens: torch.Tensor,
    labels: Optional[torch.Tensor],
    lengths: List[int],
    state: HMTState,
    block: int,
) -> StreamRows:
    """Put the unfinished segment of the previous call in front of each continued row.

    Args:
        tokens (torch.Tensor): ``[b, t]`` the caller's token ids.
        labels (Optional[torch.Tensor]): ``[b, t]`` the caller's labels.
        lengths (List[int]): per row, real tokens of ``tokens``.
        state (HMTState): the incoming state.
        block (int): new tokens per segment.

    Rows without new tokens are left as they are (their state passes through)."""
    batch, new_width = tokens.shape
    device = tokens.device
    active = [n > 0 for n in lengths]
    pend = state.pending_lengths if state.pending is not None else [0] * batch
    pend = [p if a else 0 for p, a in zip(pend, active)]
    offsets = pend
    merged_lengths = [p + n if a else 0 for p, n, a in zip(pend, lengths, active)]
    fill = CROSS_ENTROPY_IGNORE_IDX
    if labels is None:
        targets = None
    else:
        real = torch.tensor(lengths, device=device)[:, None] > torch.arange(
            new_width, device=device
        )
        targets = labels.masked_fill(~real, fill)
    active_pend = {p for p, a in zip(pend, active) if a}
    if max(pend) == 0:
        merged = tokens
    elif len(active_pend) == 1:
        p = active_pend.pop()
        merged = torch.cat([state.pending[:, :p].to(tokens), tokens], dim=1)
        targets = None if targets is None else F.pad(targets, (p, 0), value=fill)
        offsets = [p] * batch
    else:
        width = max(pend) + new_width
        rows, trows = [], []
        for b in range(batch):
            row = torch.cat([state.pending[b, : pend[b]].to(tokens), tokens[b]])
            rows.append(F.pad(row, (0, width - row.numel())))
            if targets is not None:
                trows.append(F.pad(targets[b], (pend[b], width - row.numel()), value=fill))
        merged = torch.stack(rows)
        targets = torch.stack(trows) if targets is not None else None
    return StreamRows(tokens=merged, targets=targets, lengths=merged_lengths, offsets=offsets,
                      active=active, new_width=new_width, block=block)


def starts_fresh(rows: StreamRows, state: HMTState) -> bool:
    """True when the rows with new tokens start their documents (no complete segment read
    yet); a batch mixing fresh and continued documents is refused."""
    seen = [s for s, a in zip(state.segments_seen, rows.active) if a]
    fresh = [s == 0 for s in seen]
    if any(fresh) and not all(fresh):
        raise ValueError(
            "this batch mixes documents that start fresh with documents continued from a "
            "state; read them in separate calls (or align their starts)."
        )
    return all(fresh)


def final_state(rows: StreamRows, state_in: HMTState, snaps: Dict[int, HMTState]) -> HMTState:
    """Per row, the state after its last complete segment, plus its unfinished tail.

    Args:
        rows (StreamRows): what the call read.
        state_in (HMTState): the incoming state.
        snaps (Dict[int, HMTState]): the carried state after each segment of
            :meth:`StreamRows.snapshot_rows` (-1: ``state_in``).
    """
    b = rows.batch
    at_rows = rows.snapshot_rows()
    seen_in = state_in.segments_seen
    seen = list(seen_in)
    for at, members in at_rows.items():
        for r in members:
            seen[r] = seen_in[r] + at + 1
    tails = []
    for r in range(b):
        if not rows.active[r]:
            p = state_in.pending_lengths[r] if state_in.pending is not None else 0
            tails.append(state_in.pending[r, :p] if p else None)
        else:
            full = (rows.lengths[r] // rows.block) * rows.block
            tails.append(rows.tokens[r, full : rows.lengths[r]] if rows.lengths[r] > full else None)
    pend_len = [0 if t is None else t.numel() for t in tails]
    pending = None
    if max(pend_len) > 0:
        pending = torch.zeros(b, max(pend_len), dtype=rows.tokens.dtype, device=rows.tokens.device)
        for r, t in enumerate(tails):
            if t is not None:
                pending[r, : t.numel()] = t
    if len(at_rows) == 1:
        (at,) = at_rows
        src = snaps[at]
        merged = HMTState(
            segments_seen=seen,
            memory=src.memory,
            sensory=src.sensory,
            cache=src.cache,
            cache_keys=src.cache_keys,
            cache_valid=src.cache_valid,
            last_hidden=src.last_hidden,
        )
    else:
        merged = _merge_rows(snaps, at_rows, seen, b)
    merged.pending = pending
    merged.pending_lengths = pend_len if pending is not None else None
    return merged.detach()


def _merge_rows(
    snaps: Dict[int, HMTState], rows: Dict[int, List[int]], seen: List[int], batch: int
) -> HMTState:
    """Assemble one state from per-row snapshots taken at different segments. Caches of
    different lengths are left-padded with invalid slots (oldest end)."""
    fields = ("memory", "sensory", "last_hidden")
    picked = {f: [None] * batch for f in fields}
    caches = [None] * batch
    for at, members in rows.items():
        src = snaps[at]
        for r in members:
            for f in fields:
                t = getattr(src, f)
                picked[f][r] = None if t is None else t[r]
            if src.cache is not None:
                v = src.cache_valid[r] if src.cache_valid is not None else None
                caches[r] = (src.cache[r], src.cache_keys[r], v)

    def stack(items):
        ref = next((t for t in items if t is not None), None)
        if ref is None:
            return None
        return torch.stack([t if t is not None else torch.zeros_like(ref) for t in items])

    out = HMTState(segments_seen=seen, **{f: stack(picked[f]) for f in fields})
    ref = next((c for c in caches if c is not None), None)
    if ref is not None:
        size = max(c[0].shape[0] for c in caches if c is not None)
        vals, ks, oks = [], [], []
        for c in caches:
            if c is None:
                c = (ref[0][:0], ref[1][:0], None)
            v, k, ok = c
            if ok is None:
                ok = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
            pad = size - v.shape[0]
            vals.append(F.pad(v, (0, 0, pad, 0)))
            ks.append(F.pad(k, (0, 0, pad, 0)))
            oks.append(F.pad(ok, (pad, 0), value=False))
        out.cache, out.cache_keys, out.cache_valid = torch.stack(vals), torch.stack(ks), torch.stack(oks)
    return out
