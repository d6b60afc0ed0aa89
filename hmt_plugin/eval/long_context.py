"""Long-context perplexity as the HMT paper reports it, and whole-document perplexity.

For a context length T, each document long enough is cut to its first T tokens and read
segment by segment; the score is the mean NLL of the targets in the *last* segment (the
tokens ``((T - 1) // tokens_per_segment) * tokens_per_segment .. T - 1``), i.e. how well the
model predicts after having read T tokens. Documents shorter than T are skipped (and
counted). Whole-document PPL averages every target of every document (up to ``max_tokens``).

Each document is read once, in calls of ``chunk_segments`` segments that carry the
:class:`~hmt_plugin.modules.HMTState`, so memory does not grow with T. At the start ``B`` of
the last segment of each T the state is used twice: a side call reads ``tokens[B:T]`` from it
(the last-segment score for T, the same numbers as reading the first T tokens alone, since
streaming a document in pieces gives what one call gives), and the main pass goes on with
the document. The whole-document PPL comes from the main pass. The cost is one read of each
document plus one segment per T, not a read of T tokens per T.

Another mode than the model's own reads, by default, as many new tokens per segment as the
model's mode (``keep_tokens_per_segment``: ``baseline`` and ``rmt`` then make a shorter backbone
call), so that modes compared on the same documents score the same tokens and only memory
differs. A T that is not a whole number of segments scores only the first ``T mod
tokens_per_segment`` tokens of a segment; a warning names the aligned T.

:func:`evaluate_published_test_ppl` is the published code's test PPL, a different metric (see
its docstring).
"""

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from tqdm import tqdm

from hmt_plugin.eval.memory import MemoryProbe, memory_probe as make_probe
from hmt_plugin.modules.hmt import HMT

log = logging.getLogger(__name__)


@dataclass
class ContextLengthScore:
    """The paper's metric at one context length.

    Attributes:
        context_length: T.
        documents: documents scored (at least T tokens long).
        skipped: documents shorter than T.
        tokens: targets scored (last segments).
        nll / ppl: mean NLL over them and its exp.
        peak_memory_mb: peak memory while reading the first T tokens and scoring them
            (largest over the batches; see :mod:`hmt_plugin.eval.memory` for what the probe
            counts). It grows until T spans one call of ``chunk_segments`` segments, then
            stays flat (the memory cache adds ``cache_size`` vectors at most).
    """

    context_length: int
    documents: int
    skipped: int
    tokens: int
    nll: float
    ppl: float
    peak_memory_mb: Optional[float] = None


@dataclass
class DocumentScore:
    """Token-level perplexity over whole documents."""

    documents: int
    tokens: int
    nll: float
    ppl: float
    peak_memory_mb: Optional[float] = None


@dataclass
class PublishedTestScore:
    """The published code's test PPL at one ``--test_length`` (see
    :func:`evaluate_published_test_ppl`).

    Attributes:
        test_length: its ``--test_length``.
        tokens_per_segment: L, its ``block_size``: the window slide and the tokens scored.
        windows / batches: windows read, in full batches of ``batch_size``.
        tokens: targets scored.
        ppl: the published number, the mean over batches of ``exp(batch mean NLL)``.
        token_ppl: ``exp`` of the mean NLL over every scored token (ours, on the same tokens).
    """

    test_length: int
    tokens_per_segment: int
    batch_size: int
    windows: int
    batches: int
    tokens: int
    ppl: float
    token_ppl: float


@dataclass
class LongContextResult:
    """Everything one model (in one mode) scored.

    Attributes:
        label: name of the run (default: the mode).
        mode: the HMT mode.
        tokens_per_segment: new tokens per segment in that mode.
        context: one score per context length (scored ones only).
        document: whole-document perplexity (None if not asked for).
        recall_distance: ``{segments back: count}`` of the strongest recall of every segment
            read (``hmt`` mode; the paper's Figure 11); ``no_recall`` counts first segments.
        no_recall: segments that recalled nothing (a document's first).
        memory_probe: what peak memory means here.
        tokens_read / seconds: the main pass's size and wall time.
    """

    label: str
    mode: str
    tokens_per_segment: int
    context: List[ContextLengthScore] = field(default_factory=list)
    document: Optional[DocumentScore] = None
    recall_distance: Dict[int, int] = field(default_factory=dict)
    no_recall: int = 0
    memory_probe: str = "none"
    tokens_read: int = 0
    seconds: float = 0.0
    published_test: List[PublishedTestScore] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["recall_distance"] = {str(k): v for k, v in sorted(self.recall_distance.items())}
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LongContextResult":
        """The inverse of :meth:`to_dict` (results read back from a JSON file)."""
        data = dict(data)
        data["context"] = [ContextLengthScore(**c) for c in data.get("context", [])]
        if data.get("document") is not None:
            data["document"] = DocumentScore(**data["document"])
        data["recall_distance"] = {int(k): v for k, v in data.get("recall_distance", {}).items()}
        data["published_test"] = [PublishedTestScore(**p) for p in data.get("published_test", [])]
        return cls(**data)


def check_context_lengths(context_lengths: Sequence[int], allow_empty: bool = False) -> List[int]:
    """Sorted unique context lengths; ``ValueError`` naming the field for bad values."""
    values = list(context_lengths or [])
    if not values and not allow_empty:
        raise ValueError("context_lengths is empty; give e.g. [2000, 10000, 30000].")
    for t in values:
        if not isinstance(t, int) or isinstance(t, bool) or t < 2:
            raise ValueError(
                f"context_lengths holds {t!r}; every context length must be an integer >= 2 "
                "(one token of context, one target)."
            )
    return sorted(set(values))


def document_arrays(documents: Any, max_tokens: Optional[int] = None):
    """``(tokens, labels or None)`` numpy arrays per document, cut to ``max_tokens``.

    Accepts :class:`~hmt_plugin.data.TokenizedDocuments` (labels kept when it has them) or
    any sequence of token sequences."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 2 or null.")
    out = []
    if hasattr(documents, "document_tokens"):
        with_labels = bool(getattr(documents, "has_labels", False))
        for i in range(len(documents)):
            tokens = np.asarray(documents.document_tokens(i))[:max_tokens]
            labels = np.asarray(documents.document_labels(i))[:max_tokens] if with_labels else None
            out.append((tokens, labels))
    else:
        for doc in documents:
            if isinstance(doc, dict):
                doc = doc["tokens"]
            out.append((np.asarray(doc, dtype=np.int64)[:max_tokens], None))
    return out


@contextmanager
def reading_mode(model: HMT, mode: Optional[str], keep_tokens_per_segment: bool = True) -> Iterator[None]:
    """``model`` in ``mode`` and eval mode for the block; both restored afterwards. By default
    the mode reads as many new tokens per segment as the model's own
    (:meth:`HMT.set_mode`'s ``keep_tokens_per_segment``)."""
    original, was_training = model.config, model.training
    if mode is not None:
        model.set_mode(mode, keep_tokens_per_segment=keep_tokens_per_segment)
    model.eval()
    try:
        yield
    finally:
        model.config = original
        model.train(was_training)


def misaligned_context_lengths(context_lengths: Sequence[int], tokens_per_segment: int) -> List[str]:
    """One message per T that is not a whole number of segments, naming the aligned T."""
    out = []
    for t in context_lengths:
        part = t % tokens_per_segment
        if part:
            lower, upper = t - part, t - part + tokens_per_segment
            aligned = f"T={lower} or T={upper}" if lower else f"T={upper}"
            out.append(
                f"context length T={t} ends {part} tokens into a segment of {tokens_per_segment} new "
                f"tokens: its score covers those {part} tokens only (the first tokens of a segment, "
                "hard for every model; HMT recalls for them from a summary of fewer tokens than it "
                f"was trained with). {aligned} scores a whole segment."
            )
    return out


@torch.inference_mode()
def evaluate_long_context(
    model: HMT,
    documents: Any,
    *,
    context_lengths: Sequence[int],
    mode: Optional[str] = None,
    label: Optional[str] = None,
    batch_size: int = 1,
    chunk_segments: int = 16,
    max_tokens: Optional[int] = None,
    document_ppl: bool = True,
    memory: Any = "auto",
    progress: bool = False,
    keep_tokens_per_segment: bool = True,
) -> LongContextResult:
    """Score ``documents`` at each context length (and whole) in one streaming read.

    Args:
        model (HMT): the model.
        documents: :class:`~hmt_plugin.data.TokenizedDocuments` or token sequences. Documents
            with labels (synthetic tasks) are scored on their labels.
        context_lengths: the T values (the paper: 2000, 10000, 30000, 60000, 100000); may be
            empty with ``document_ppl``.
        mode (Optional[str]): read in this mode (default: the model's); restored afterwards.
        label (Optional[str]): name of the result (default: the mode).
        batch_size (int): documents read side by side.
        chunk_segments (int): segments per model call; the activation memory bound.
        max_tokens (Optional[int]): read at most this many tokens of each document.
        document_ppl (bool): also read every document to its end for whole-document PPL
            (otherwise each stops at its largest T).
        keep_tokens_per_segment (bool): ``mode`` reads as many new tokens per segment as the
            model's own mode (default; see :meth:`HMT.set_mode`).
        memory: a :class:`MemoryProbe` or its name (``auto``, ``cuda``, ``tensor_bytes``,
            ``rss``, ``none``).
        progress (bool): show a progress bar over documents.

    Returns:
        LongContextResult

    Raises:
        ValueError: bad context lengths, or one larger than every document (named).
    """
    ts = check_context_lengths(context_lengths, allow_empty=document_ppl)
    for name, value in (("batch_size", batch_size), ("chunk_segments", chunk_segments)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    docs = document_arrays(documents, max_tokens)
    longest = max((len(t) for t, _ in docs), default=0)
    beyond = [t for t in ts if t > longest]
    if beyond:
        cut = f" (cut to max_tokens={max_tokens})" if max_tokens is not None else ""
        raise ValueError(
            f"context_lengths {beyond} exceed the longest document ({longest} tokens{cut}); "
            "lower those context lengths, raise max_tokens, or use longer documents."
        )
    device = next(model.parameters()).device
    probe = memory if isinstance(memory, MemoryProbe) else make_probe(memory, device)
    with reading_mode(model, mode, keep_tokens_per_segment):
        cfg = model.config
        for message in misaligned_context_lengths(ts, cfg.tokens_per_segment):
            log.warning(f"{label or cfg.mode}: {message}")
        scorer = _Scorer(model, ts, chunk_segments * cfg.tokens_per_segment, document_ppl, probe)
        rows = [
            i for i, (t, _) in enumerate(docs) if len(t) >= 2 and (document_ppl or len(t) >= ts[0])
        ]
        start = time.perf_counter()
        bar = tqdm(total=len(rows), desc=f"{label or cfg.mode}", disable=not progress)
        for lo in range(0, len(rows), batch_size):
            batch = [docs[i] for i in rows[lo : lo + batch_size]]
            scorer.read_batch(batch)
            bar.update(len(batch))
        bar.close()
        result = scorer.result(label or cfg.mode, docs, time.perf_counter() - start)
    return result


def published_test_windows(stream_length: int, test_length: int, block: int) -> List[tuple]:
    """``(start, end)`` of the published test windows over a stream of ``stream_length``
    tokens: ``[max(0, i - block), i + test_length)`` for ``i = 0, block, 2 * block, ...``
    (its ``group_texts(x, test_length, block_size)``), cut at the stream's end."""
    return [(max(0, i - block), min(i + test_length, stream_length)) for i in range(0, stream_length, block)]


@torch.inference_mode()
def evaluate_published_test_ppl(
    model: HMT,
    documents: Any,
    *,
    test_lengths: Sequence[int],
    batch_size: int = 1,
    test_step: Optional[int] = None,
    mode: Optional[str] = None,
    chunk_segments: int = 16,
    max_tokens: Optional[int] = None,
    keep_tokens_per_segment: bool = True,
) -> List[PublishedTestScore]:
    """The test PPL of the published code (hmt_src/main.py, its test loop), on our model.

    The documents are concatenated into one stream (its ``group_texts`` concatenates a map
    batch of documents). For each ``test_length`` T and L = the mode's new tokens per
    segment: windows ``[max(0, i - L), i + T)`` for ``i = 0, L, 2L, ...`` (T + L tokens,
    sliding by L; the first and the last are shorter), each read from a fresh state; the
    last L tokens of each window are scored (all but the first when a window holds L or
    fewer); windows go in batches of ``batch_size`` in order, the last incomplete batch
    dropped (``drop_last``), at most ``test_step`` batches; the result is the mean over
    batches of ``exp(mean NLL of the batch)``.

    How it differs from :func:`evaluate_long_context`: it scores the L tokens that end a window
    of T + L, which straddle two segments unless T is a multiple of L, not the last segment
    after T tokens of one document; windows cross document boundaries; and a mean of
    per-batch exponentials is at least the exponential of the mean (Jensen), more so with
    small batches. ``token_ppl`` gives the latter on the same tokens. The published code
    left-pads a batch's shorter windows; here rows are right-padded with exact masks, so a
    window scores the same whatever it is batched with.
    """
    ts = check_context_lengths(test_lengths)
    for name, value in (("batch_size", batch_size), ("chunk_segments", chunk_segments)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if test_step is not None and (not isinstance(test_step, int) or test_step < 1):
        raise ValueError(f"test_step={test_step!r} must be a positive integer or null (every batch).")
    docs = document_arrays(documents, max_tokens)
    if not docs:
        raise ValueError("no documents to score.")
    stream = np.concatenate([t for t, _ in docs])
    labels = np.concatenate([t if lab is None else lab for t, lab in docs])
    device = next(model.parameters()).device
    out = []
    with reading_mode(model, mode, keep_tokens_per_segment):
        block = model.config.tokens_per_segment
        chunk = chunk_segments * block
        for t in ts:
            windows = published_test_windows(len(stream), t, block)
            n_batches = len(windows) // batch_size
            if test_step is not None:
                n_batches = min(n_batches, test_step)
            if n_batches == 0:
                raise ValueError(
                    f"test_length={t}: the {len(stream)}-token test stream gives {len(windows)} windows, "
                    f"fewer than one batch of batch_size={batch_size}; lower the batch size or add documents."
                )
            batch_ppl, nll_sum, count = [], 0.0, 0
            for k in range(n_batches):
                rows = windows[k * batch_size : (k + 1) * batch_size]
                total, scored = _read_windows(model, stream, labels, rows, block, chunk, device)
                batch_ppl.append(_exp(total / scored))
                nll_sum, count = nll_sum + total, count + scored
            out.append(PublishedTestScore(
                test_length=t, tokens_per_segment=block, batch_size=batch_size,
                windows=n_batches * batch_size, batches=n_batches, tokens=count,
                ppl=float(np.mean(batch_ppl)), token_ppl=_exp(nll_sum / count),
            ))
    return out


def _read_windows(model: HMT, stream, labels, rows, block: int, chunk: int, device) -> tuple:
    """Sum of the NLL of the published scored targets over a batch of windows, and their
    count; each window read from a fresh state, in calls of ``chunk`` tokens."""
    lengths = [end - start for start, end in rows]
    width = max(lengths)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), CROSS_ENTROPY_IGNORE_IDX, dtype=np.int64)
    for r, (start, end) in enumerate(rows):
        n = end - start
        tokens[r, :n] = stream[start:end]
        # Its mask_size: the last L labels, or all but the first of a window of <= L tokens.
        first = n - block if n > block else 1
        targets[r, first:n] = labels[start + first : end]
    scored = int((targets != CROSS_ENTROPY_IGNORE_IDX).sum())
    tokens_t = torch.from_numpy(tokens).to(device)
    targets_t = torch.from_numpy(targets).to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    for pos in range(0, width, chunk):
        w = min(chunk, width - pos)
        seq_lens = [max(0, min(w, n - pos)) for n in lengths]
        result = model(tokens_t[:, pos : pos + w], seq_lens=seq_lens, labels=targets_t[:, pos : pos + w],
                       state=state, logits="none")
        state = result.state
        total += result.nll.sum(dtype=torch.float64)
        del result
    return float(total), scored


_PADDING = -2  # recall distance of a segment a row does not have


class _Scorer:
    """Accumulates the sums of :func:`evaluate_long_context` over batches of documents."""

    def __init__(
        self, model: HMT, ts: List[int], chunk: int, document_ppl: bool, probe: MemoryProbe
    ):
        self.model = model
        self.cfg = model.config
        self.block = self.cfg.tokens_per_segment
        self.ts = ts
        self.chunk = chunk
        self.document_ppl = document_ppl
        self.probe = probe
        self.device = next(model.parameters()).device
        self.last_sum = {t: torch.zeros((), dtype=torch.float64, device=self.device) for t in ts}
        self.last_count = {t: 0 for t in ts}
        self.last_docs = {t: 0 for t in ts}
        self.peak = {t: None for t in ts}
        self.doc_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.doc_count = 0
        self.doc_docs = 0
        self.doc_peak: Optional[int] = None
        self.distances: List[torch.Tensor] = []
        self.tokens_read = 0

    # ------------------------------------------------------------------ one batch
    def read_batch(self, batch) -> None:
        b = len(batch)
        lengths = [len(t) for t, _ in batch]
        row_ts = [[t for t in self.ts if t <= n] for n in lengths]
        ends = [n if self.document_ppl else max(r) for n, r in zip(lengths, row_ts)]
        width = max(ends)
        tokens = np.zeros((b, width), dtype=np.int64)
        labels = np.full((b, width), CROSS_ENTROPY_IGNORE_IDX, dtype=np.int64)
        for r, (t, lab) in enumerate(batch):
            tokens[r, : ends[r]] = t[: ends[r]]
            labels[r, : ends[r]] = (t if lab is None else lab)[: ends[r]]
        self._scored = labels != CROSS_ENTROPY_IGNORE_IDX  # host copy, for counting
        self._tokens = torch.from_numpy(tokens).to(self.device)
        self._labels = torch.from_numpy(labels).to(self.device)
        self._ends = ends
        self._state = None
        self._pos = 0

        so_far = None  # peak since the start of the batch: what reading the first T tokens needs
        for t in sorted({t for r in row_ts for t in r}):
            boundary = ((t - 1) // self.block) * self.block
            with self.probe.measure() as reading:
                self._advance(boundary)
                self._score_last_segment(t, boundary, [t in r for r in row_ts])
            so_far = _max(so_far, reading.peak_bytes)
            self.peak[t] = _max(self.peak[t], so_far)
        if self.document_ppl:
            with self.probe.measure() as reading:
                self._advance(width)
            self.doc_peak = _max(self.doc_peak, reading.peak_bytes)
            for r in range(b):
                self.doc_count += int(self._scored[r, 1 : ends[r]].sum())
            self.doc_docs += b

    def _advance(self, stop: int) -> None:
        """Main pass from ``self._pos`` to ``stop`` (a segment boundary or the batch's end)."""
        while self._pos < stop:
            pos = self._pos
            width = min(self.chunk, stop - pos)
            seq_lens = [max(0, min(width, e - pos)) for e in self._ends]
            self._pos = pos + width
            if not any(seq_lens):
                continue
            out = self.model(
                self._tokens[:, pos : pos + width],
                seq_lens=seq_lens,
                labels=self._labels[:, pos : pos + width],
                state=self._state,
                logits="none",
            )
            self._state = out.state
            self.tokens_read += sum(seq_lens)
            if self.document_ppl:
                # nll is 0 where nothing is scored (padding, ignored labels, a document's
                # first token), so the plain sum is the sum over scored targets.
                self.doc_sum += out.nll.sum(dtype=torch.float64)
            if out.recall_scores is not None:
                dist = out.recall_distance(self.cfg.num_memory_tokens)
                n_seg = dist.shape[1]
                real = torch.tensor(
                    [[n * self.block < s for n in range(n_seg)] for s in seq_lens],
                    device=dist.device,
                )
                # Padding segments become -2 (dropped when counting at the end): boolean
                # indexing here would make the host wait for the device at every call.
                self.distances.append(dist.masked_fill(~real, _PADDING).flatten())
            # Drop this call's outputs before the next call runs, or both are alive at once.
            del out

    def _score_last_segment(self, t: int, boundary: int, rows: List[bool]) -> None:
        """Side call: targets ``boundary .. t-1`` of the rows that reach ``t``, from the state
        at ``boundary``."""
        seq_lens = [t - boundary if use else 0 for use in rows]
        out = self.model(
            self._tokens[:, boundary:t],
            seq_lens=seq_lens,
            labels=self._labels[:, boundary:t],
            state=self._state,
            logits="none",
        )
        keep = torch.tensor(rows, device=self.device)[:, None]
        self.last_sum[t] += out.nll.masked_fill(~keep, 0).sum(dtype=torch.float64)
        first = max(1, boundary)  # a document's first token has no prediction
        for r, use in enumerate(rows):
            if use:
                self.last_count[t] += int(self._scored[r, first:t].sum())
                self.last_docs[t] += 1

    # ------------------------------------------------------------------ results
    def result(self, label: str, docs, seconds: float) -> LongContextResult:
        lengths = [len(t) for t, _ in docs]
        scores = []
        for t in self.ts:
            n = self.last_count[t]
            nll = float(self.last_sum[t]) / n if n else float("nan")
            scores.append(
                ContextLengthScore(
                    context_length=t,
                    documents=self.last_docs[t],
                    skipped=sum(1 for x in lengths if x < t),
                    tokens=n,
                    nll=nll,
                    ppl=_exp(nll),
                    peak_memory_mb=_mb(self.peak[t]),
                )
            )
        document = None
        if self.document_ppl:
            nll = float(self.doc_sum) / self.doc_count if self.doc_count else float("nan")
            document = DocumentScore(
                documents=self.doc_docs,
                tokens=self.doc_count,
                nll=nll,
                ppl=_exp(nll),
                peak_memory_mb=_mb(_max(self.doc_peak, *self.peak.values())),
            )
        hist: Dict[int, int] = {}
        no_recall = 0
        if self.distances:
            values, counts = torch.cat(self.distances).unique(return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                if v == _PADDING:
                    continue
                if v < 0:
                    no_recall += c
                else:
                    hist[v] = c
        return LongContextResult(
            label=label,
            mode=self.cfg.mode,
            tokens_per_segment=self.block,
            context=scores,
            document=document,
            recall_distance=hist,
            no_recall=no_recall,
            memory_probe=self.probe.name,
            tokens_read=self.tokens_read,
            seconds=seconds,
        )


def _max(*values: Optional[int]) -> Optional[int]:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 2**20


def _exp(nll: float) -> float:
    if math.isnan(nll):
        return float("nan")
    return math.exp(nll) if nll < 700 else float("inf")


def format_long_context_table(results: Sequence[LongContextResult]) -> str:
    """PPL of the last segment by context length (one column per run), then document PPL
    and peak memory."""
    ts = sorted({s.context_length for r in results for s in r.context})
    head = f"{'T':>8} " + " ".join(f"{r.label:>14}" for r in results)
    lines = ["Last-segment perplexity after T tokens of context", head]
    for t in ts:
        cells = []
        for r in results:
            s = next((s for s in r.context if s.context_length == t), None)
            cells.append(f"{s.ppl:>14.3f}" if s is not None and s.tokens else f"{'-':>14}")
        lines.append(f"{t:>8} " + " ".join(cells))
    docs = [r.document for r in results]
    if any(d is not None for d in docs):
        lines.append(
            f"{'doc PPL':>8} "
            + " ".join(f"{d.ppl:>14.3f}" if d is not None else f"{'-':>14}" for d in docs)
        )
    measured = any(s.peak_memory_mb is not None for r in results for s in r.context)
    if measured:
        lines.append("")
        lines.append(
            f"Peak memory (MB) by T ({', '.join(sorted({r.memory_probe for r in results}))})"
        )
        lines.append(head)
    for t in ts if measured else []:
        cells = []
        for r in results:
            s = next((s for s in r.context if s.context_length == t), None)
            mb = None if s is None else s.peak_memory_mb
            cells.append(f"{mb:>14.2f}" if mb is not None else f"{'-':>14}")
        lines.append(f"{t:>8} " + " ".join(cells))
    skipped = (
        [f"T={s.context_length}: {s.skipped}" for s in results[0].context if s.skipped]
        if results
        else []
    )
    if skipped:
        lines.append("")
        lines.append("Documents skipped (shorter than T): " + ", ".join(skipped))
    return "\n".join(lines)


def format_published_test_table(results: Sequence[LongContextResult]) -> str:
    """The published code's test PPL by test length, one column per run (and, in brackets,
    exp of the mean NLL over the same tokens)."""
    ts = sorted({s.test_length for r in results for s in r.published_test})
    lines = [
        "Published test PPL (mean over batches of exp(batch loss); [exp of the mean NLL])",
        f"{'T':>8} " + " ".join(f"{r.label:>22}" for r in results),
    ]
    for t in ts:
        cells = []
        for r in results:
            s = next((s for s in r.published_test if s.test_length == t), None)
            cells.append(f"{f'{s.ppl:.3f} [{s.token_ppl:.3f}]':>22}" if s is not None else f"{'-':>22}")
        lines.append(f"{t:>8} " + " ".join(cells))
    return "\n".join(lines)
