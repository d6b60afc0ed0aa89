"""Windows over tokenized documents: whole documents for evaluation, runs of
``segments_per_window`` segments for training (HMT's truncated-BPTT unit)."""

import logging
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from hmt_plugin.data.documents import TokenizedDocuments

log = logging.getLogger(__name__)

# A window needs two tokens for one next-token target.
MIN_WINDOW_TOKENS = 2
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays: a well-mixed hash of each value."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def window_offsets(seed: int, epoch: int, num_docs: int, upper: np.ndarray) -> np.ndarray:
    """``[num_docs]`` offsets, offset ``i`` uniform-ish in ``[0, upper[i])`` and a function of
    ``(seed, epoch, i)`` alone, so a resumed run or another rank sees the same grid."""
    base = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    h = _splitmix64(base ^ np.arange(num_docs, dtype=np.uint64))
    return (h % np.maximum(upper, 1).astype(np.uint64)).astype(np.int64)


class SegmentWindows(Dataset):
    """Map-style dataset of windows over documents, laid out for segment recurrence.

    * Evaluation (``segments_per_window=None``): one window per document, the whole
      document (its first ``max_tokens`` tokens if given).
    * Training: windows of ``W = segments_per_window * tokens_per_segment`` tokens, starting
      every ``stride`` tokens (default ``W``: back to back). A document's last window may be
      shorter; it is kept unless it has fewer than 2 tokens. Windows stop once one reaches the
      document's end, so a ``stride < W`` (overlap) adds no windows inside the last one.
      ``random_offset=True`` shifts each document's grid by an offset drawn from
      ``(seed, epoch, document index)`` in ``[0, min(stride, n - W + 1))`` (``n`` the document
      length): the first window stays full and a document no longer than ``W`` is never cut.
      The tokens before the offset are not seen that epoch.

    Windows never cross a document boundary; concatenate the documents first
    (``TokenizedDocuments.concatenated()``, or ``concatenate=True`` in the builders) for that.

    Items::

        {"tokens": int64 [n], "labels": int64 [n] (if the documents have labels),
         "doc_id": int, "start": int, <per-document fields>}

    Indexing is a pure function of ``(seed, epoch, index)``. Call :meth:`set_epoch` at the
    start of each epoch (with ``random_offset`` the number of windows may change by epoch;
    torch's ``DistributedSampler`` pads or trims to its fixed size, so recipes keep working).

    Args:
        documents (TokenizedDocuments): the documents (a list of token sequences is wrapped).
        tokens_per_segment (int): new tokens per HMT segment (``model.config.tokens_per_segment``).
        segments_per_window (Optional[int]): segments per training window (e.g. the BPTT
            depth); None for evaluation.
        stride (Optional[int]): tokens between window starts; default the window length
            (training only: evaluation ignores it, with a warning).
        random_offset (bool): shift each document's window grid per epoch (training only).
        max_tokens (Optional[int]): read only the first ``max_tokens`` tokens of each document.
        seed (int): seed of the offsets.
    """

    def __init__(
        self,
        documents: Union[TokenizedDocuments, Sequence[Sequence[int]]],
        *,
        tokens_per_segment: int,
        segments_per_window: Optional[int] = None,
        stride: Optional[int] = None,
        random_offset: bool = False,
        max_tokens: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(documents, TokenizedDocuments):
            documents = TokenizedDocuments.from_sequences(documents)
        for name, value in (
            ("tokens_per_segment", tokens_per_segment),
            ("segments_per_window", segments_per_window),
            ("stride", stride),
            ("max_tokens", max_tokens),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if segments_per_window is None and (stride is not None or random_offset):
            # A windows config shared by training and evaluation should still work.
            log.warning(
                "SegmentWindows: stride=%s / random_offset=%s are ignored in evaluation mode "
                "(segments_per_window=None reads whole documents).",
                stride,
                random_offset,
            )
            stride, random_offset = None, False
        self.documents = documents
        self.tokens_per_segment = tokens_per_segment
        self.segments_per_window = segments_per_window
        self.window_tokens = (
            segments_per_window * tokens_per_segment if segments_per_window is not None else None
        )
        self.stride = stride if stride is not None else self.window_tokens
        self.random_offset = random_offset
        self.max_tokens = max_tokens
        self.seed = seed
        self.epoch = 0
        self._build()

    # ------------------------------------------------------------------ the window table
    def _build(self) -> None:
        """Compute ``[num_windows]`` doc / start / stop arrays for the current epoch."""
        lengths = self.documents.lengths
        if self.max_tokens is not None:
            lengths = np.minimum(lengths, self.max_tokens)
        num_docs = lengths.size
        if self.window_tokens is None:
            doc = np.arange(num_docs, dtype=np.int64)
            start = np.zeros(num_docs, dtype=np.int64)
            stop = lengths.astype(np.int64)
        else:
            w, s = self.window_tokens, self.stride
            if self.random_offset:
                upper = np.minimum(s, np.maximum(lengths - w + 1, 1))
                offset = window_offsets(self.seed, self.epoch, num_docs, upper)
            else:
                offset = np.zeros(num_docs, dtype=np.int64)
            rest = lengths - offset
            # Windows while the start is inside the document and the previous one did not
            # reach its end: min(ceil(rest / s), 1 + ceil((rest - w) / s)).
            by_start = -(-rest // s)
            by_end = 1 + -(-np.maximum(rest - w, 0) // s)
            count = np.where(rest > 0, np.minimum(by_start, by_end), 0)
            doc = np.repeat(np.arange(num_docs, dtype=np.int64), count)
            first = np.repeat(np.cumsum(count) - count, count)
            k = np.arange(doc.size, dtype=np.int64) - first
            start = offset[doc] + k * s
            stop = np.minimum(start + w, lengths[doc])
        keep = stop - start >= MIN_WINDOW_TOKENS
        self._doc, self._start, self._stop = doc[keep], start[keep], stop[keep]

    def set_epoch(self, epoch: int) -> None:
        """Use the window grid of ``epoch`` (matters with ``random_offset``)."""
        self.epoch = int(epoch)
        if self.random_offset:
            self._build()

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self._doc.size)

    @property
    def num_tokens(self) -> int:
        """Tokens in all windows of this epoch."""
        return int((self._stop - self._start).sum())

    def window(self, index: int) -> tuple:
        """``(doc_id, start, stop)`` of window ``index``."""
        return int(self._doc[index]), int(self._start[index]), int(self._stop[index])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {index} is out of range for {n} windows.")
        doc, start, stop = self.window(i)
        item = self.documents.slice(doc, start, stop)
        item["doc_id"] = doc
        item["start"] = start
        return item

    def __repr__(self) -> str:
        mode = (
            "eval"
            if self.window_tokens is None
            else f"train(window={self.window_tokens}, stride={self.stride})"
        )
        return (
            f"SegmentWindows({mode}, windows={len(self)}, documents={len(self.documents)}, "
            f"epoch={self.epoch})"
        )
