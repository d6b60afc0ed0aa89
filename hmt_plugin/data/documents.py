"""Tokenized documents: one flat token array plus document offsets."""

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset


class TokenizedDocuments(Dataset):
    """A map-style dataset of tokenized documents, kept apart.

    All documents live in one flat 1-D token array (memory-mapped when it comes from the
    cache); document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``. Items are::

        {"tokens": np.ndarray int64 [n_i],
         "labels": np.ndarray int64 [n_i]   (only when the builder defines labels),
         <field>: int                        (per-document fields, e.g. "distance")}

    Args:
        tokens (np.ndarray): ``[N]`` token ids of all documents, back to back.
        offsets (np.ndarray): ``[D + 1]`` start of each document in ``tokens``, then ``N``.
        labels (Optional[np.ndarray]): ``[N]`` targets aligned with ``tokens`` (unshifted, -100
            where no loss is wanted), or None: the targets are the tokens themselves.
        fields (Optional[Mapping[str, np.ndarray]]): per-document integer values, each ``[D]``.
        names (Optional[Sequence[str]]): where each document came from (file, row), for messages.
        skipped_empty (int): empty documents the builder dropped.
        vocab_size (Optional[int]): size of the vocabulary the ids were checked against.
        bos_id (Optional[int]): the BOS id each document starts with, if the builder added one.
        eos_id (Optional[int]): the EOS id each document ends with, if the builder added one.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        *,
        labels: Optional[np.ndarray] = None,
        fields: Optional[Mapping[str, np.ndarray]] = None,
        names: Optional[Sequence[str]] = None,
        skipped_empty: int = 0,
        vocab_size: Optional[int] = None,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
    ) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array; got shape {tokens.shape}.")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must hold integer ids; got dtype {tokens.dtype}.")
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
            raise ValueError(
                "offsets must be a 1-D array starting at 0 (one entry per document + 1)."
            )
        if offsets[-1] != tokens.shape[0] or (offsets.size > 1 and np.any(np.diff(offsets) < 0)):
            raise ValueError(
                f"offsets must be non-decreasing and end at len(tokens)={tokens.shape[0]}; "
                f"they end at {int(offsets[-1])}."
            )
        if labels is not None and labels.shape != tokens.shape:
            raise ValueError(f"labels shape {labels.shape} differs from tokens {tokens.shape}.")
        num_docs = offsets.size - 1
        fields = {k: np.asarray(v) for k, v in (fields or {}).items()}
        for key, value in fields.items():
            if value.shape != (num_docs,):
                raise ValueError(
                    f"field {key!r} must hold one value per document ({num_docs}); "
                    f"got shape {value.shape}."
                )
        if names is not None and len(names) != num_docs:
            raise ValueError(f"names has {len(names)} entries for {num_docs} documents.")
        self.tokens = tokens
        self.offsets = offsets
        self.labels = labels
        self.fields: Dict[str, np.ndarray] = fields
        self.names: Optional[List[str]] = list(names) if names is not None else None
        self.skipped_empty = int(skipped_empty)
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        *,
        labels: Optional[Sequence[Sequence[int]]] = None,
        **kwargs: Any,
    ) -> "TokenizedDocuments":
        """Build from a list of per-document token lists (tests, small generated sets)."""
        arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        flat_labels = None
        if labels is not None:
            label_arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in labels]
            if [a.size for a in label_arrays] != lengths.tolist():
                raise ValueError("each document's labels must have as many entries as its tokens.")
            flat_labels = np.concatenate(label_arrays) if label_arrays else tokens.copy()
        return cls(tokens, offsets, labels=flat_labels, **kwargs)

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        """``[D]`` int64 tokens per document."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents together."""
        return int(self.offsets[-1])

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    # ------------------------------------------------------------------ access
    def _index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {index} is out of range for {n} documents.")
        return i

    def slice(self, index: int, start: int = 0, stop: Optional[int] = None) -> Dict[str, Any]:
        """Tokens ``start:stop`` of document ``index`` (and labels, fields) as an item.

        Copies only the slice (int64), so windows over a memory-mapped corpus stay cheap."""
        i = self._index(index)
        begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
        lo = begin + max(0, min(int(start), end - begin))
        hi = end if stop is None else begin + max(0, min(int(stop), end - begin))
        hi = max(hi, lo)
        item: Dict[str, Any] = {"tokens": np.asarray(self.tokens[lo:hi], dtype=np.int64)}
        if self.labels is not None:
            item["labels"] = np.asarray(self.labels[lo:hi], dtype=np.int64)
        for key, value in self.fields.items():
            item[key] = value[i].item()
        return item

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.slice(index)

    def document_tokens(self, index: int) -> np.ndarray:
        """A view (no copy, original dtype) of document ``index``'s tokens."""
        i = self._index(index)
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def document_labels(self, index: int) -> np.ndarray:
        """Document ``index``'s labels (int64); its tokens when there are no labels."""
        i = self._index(index)
        source = self.labels if self.labels is not None else self.tokens
        return np.asarray(source[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)

    # ------------------------------------------------------------------ views
    def concatenated(self) -> "TokenizedDocuments":
        """All documents as one, so windows may cross document boundaries (no copy).

        The BOS/EOS tokens the builder put around each document stay in the stream as
        separators. Per-document fields and names are dropped."""
        return TokenizedDocuments(
            self.tokens,
            np.array([0, self.num_tokens], dtype=np.int64),
            labels=self.labels,
            skipped_empty=self.skipped_empty,
            vocab_size=self.vocab_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
        )

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        """Send a memory-mapped token file by path, not by content (DataLoader workers
        started with 'spawn', multi-process evaluation)."""
        state = dict(self.__dict__)
        tokens = self.tokens
        if isinstance(tokens, np.memmap) and getattr(tokens, "filename", None):
            state["tokens"] = (
                "memmap",
                tokens.filename,
                tokens.offset,
                tokens.dtype.str,
                tokens.shape,
            )
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens and tokens[0] == "memmap":
            _, filename, offset, dtype, shape = tokens
            state["tokens"] = np.memmap(
                filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape
            )
        self.__dict__.update(state)

    def __repr__(self) -> str:
        extras = f", fields={sorted(self.fields)}" if self.fields else ""
        return (
            f"TokenizedDocuments(documents={len(self)}, tokens={self.num_tokens}, "
            f"labels={self.has_labels}, skipped_empty={self.skipped_empty}{extras})"
        )
