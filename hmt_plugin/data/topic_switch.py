"""The HMT paper's topic-switching variants of a document set.

* :func:`interleaved_dataset`: two documents interleaved every ``n`` tokens (A's first n,
  B's first n, A's next n, ...), so the context switches topic at known places.
* :func:`dilated_dataset`: a document with filler tokens inserted after every ``n`` real
  tokens, stretching the distance between related tokens.

Both take either a :class:`~hmt_plugin.data.TokenizedDocuments` (from any builder) or, like
every builder here, a tokenizer first plus :func:`~hmt_plugin.data.long_text_dataset`'s
arguments, so they work as a YAML ``_component_``::

    dataset:
      _component_: hmt_plugin.data.interleaved_dataset
      source: /data/books
      strip_gutenberg: true
      every_n_tokens: 512

The source documents' BOS/EOS (as recorded by the builder) are taken off before mixing and
put back around each new document.
"""

from typing import Any, Optional, Tuple

import numpy as np
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from hmt_plugin.data.documents import TokenizedDocuments
from hmt_plugin.data.long_text import long_text_dataset
from hmt_plugin.data.tokenizer_utils import check_ids, vocab_size_of

PAIRINGS = ("adjacent", "random")


def _resolve(documents_or_tokenizer: Any, source: Any, builder_kwargs: dict) -> TokenizedDocuments:
    if isinstance(documents_or_tokenizer, TokenizedDocuments):
        if source is not None or builder_kwargs:
            raise ValueError(
                "source and builder arguments are for building documents from a tokenizer; "
                "they cannot be combined with a TokenizedDocuments."
            )
        return documents_or_tokenizer
    if source is None:
        raise ValueError("give a TokenizedDocuments, or a tokenizer and source= to build one.")
    return long_text_dataset(documents_or_tokenizer, source, **builder_kwargs)


def _body(docs: TokenizedDocuments, i: int) -> Tuple[int, int]:
    """Global ``[start, stop)`` of document i without the BOS/EOS its builder added."""
    start, stop = int(docs.offsets[i]), int(docs.offsets[i + 1])
    if docs.bos_id is not None and stop > start and int(docs.tokens[start]) == docs.bos_id:
        start += 1
    if docs.eos_id is not None and stop > start and int(docs.tokens[stop - 1]) == docs.eos_id:
        stop -= 1
    return start, stop


def _wrap(
    docs: TokenizedDocuments, tokens: np.ndarray, labels: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Put the source's BOS/EOS back around a new document. EOS is a target as in the source:
    itself for plain text, ignored when the source has its own labels."""
    head = [docs.bos_id] if docs.bos_id is not None else []
    tail = [docs.eos_id] if docs.eos_id is not None else []
    tail_label = tail if docs.labels is None else [CROSS_ENTROPY_IGNORE_IDX] * len(tail)
    return (
        np.concatenate([head, tokens, tail]).astype(np.int64),
        np.concatenate([head, labels, tail_label]).astype(np.int64),
    )


def interleave_positions(a: Tuple[int, int], b: Tuple[int, int], n: int) -> np.ndarray:
    """Global token positions of A and B interleaved in chunks of ``n``.

    Chunks alternate A, B, A, B, ... while both documents have tokens left; the round in
    which the shorter one runs out is the last (its last chunk may be short, and the longer
    document's rest is dropped)."""
    len_a, len_b = a[1] - a[0], b[1] - b[0]
    rounds = min(-(-len_a // n), -(-len_b // n))
    grid = np.full((rounds, 2, n), -1, dtype=np.int64)
    for side, (start, length) in enumerate(((a[0], len_a), (b[0], len_b))):
        take = min(length, rounds * n)
        flat = np.full(rounds * n, -1, dtype=np.int64)
        flat[:take] = start + np.arange(take)
        grid[:, side, :] = flat.reshape(rounds, n)
    order = grid.reshape(-1)
    return order[order >= 0]


def interleaved_dataset(
    documents_or_tokenizer: Any,
    source: Any = None,
    *,
    every_n_tokens: int,
    pairing: str = "adjacent",
    max_pairs: Optional[int] = None,
    seed: int = 0,
    **builder_kwargs: Any,
) -> TokenizedDocuments:
    """Pairs of documents interleaved every ``every_n_tokens`` tokens.

    Args:
        documents_or_tokenizer: a TokenizedDocuments, or a tokenizer (then ``source`` and
            ``builder_kwargs`` go to :func:`long_text_dataset`).
        source: see :func:`long_text_dataset`.
        every_n_tokens (int): chunk length n.
        pairing (str): ``"adjacent"`` pairs documents (0, 1), (2, 3), ...; ``"random"`` pairs a
            seeded permutation. An odd document out is left out.
        max_pairs (Optional[int]): keep at most this many pairs.
        seed (int): seed of the random pairing.

    Returns:
        TokenizedDocuments: one document per pair, with fields ``doc_a`` and ``doc_b`` (source
        indices); labels interleaved alongside when the source has them.
    """
    docs = _resolve(documents_or_tokenizer, source, builder_kwargs)
    if not isinstance(every_n_tokens, int) or every_n_tokens < 1:
        raise ValueError(f"every_n_tokens={every_n_tokens!r} must be a positive integer.")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r}: use 'adjacent' or 'random'.")
    order = np.arange(len(docs))
    if pairing == "random":
        order = np.random.default_rng(seed).permutation(len(docs))
    pairs = order[: 2 * (len(order) // 2)].reshape(-1, 2)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    if len(pairs) == 0:
        raise ValueError(f"interleaving needs at least two documents; got {len(docs)}.")
    source_labels = docs.labels if docs.labels is not None else docs.tokens
    out_tokens, out_labels = [], []
    for a, b in pairs.tolist():
        pos = interleave_positions(_body(docs, a), _body(docs, b), every_n_tokens)
        tokens, labels = _wrap(
            docs, np.asarray(docs.tokens[pos], np.int64), np.asarray(source_labels[pos], np.int64)
        )
        out_tokens.append(tokens)
        out_labels.append(labels)
    return TokenizedDocuments.from_sequences(
        out_tokens,
        labels=out_labels if docs.labels is not None else None,
        fields={"doc_a": pairs[:, 0], "doc_b": pairs[:, 1]},
        vocab_size=docs.vocab_size,
        bos_id=docs.bos_id,
        eos_id=docs.eos_id,
    )


def dilate(
    tokens: np.ndarray,
    labels: np.ndarray,
    *,
    every_n_tokens: int,
    filler_tokens: int,
    filler_id: int,
    label_filler: bool,
) -> Tuple[np.ndarray, np.ndarray]:
    """Insert ``filler_tokens`` copies of ``filler_id`` after every ``every_n_tokens`` tokens
    (not after the last chunk). Filler positions are labelled ``filler_id`` if
    ``label_filler`` else -100."""
    n = tokens.size
    chunks = -(-n // every_n_tokens)
    out_len = n + max(chunks - 1, 0) * filler_tokens
    real = np.arange(n) + (np.arange(n) // every_n_tokens) * filler_tokens
    out = np.full(out_len, filler_id, dtype=np.int64)
    out_labels = np.full(
        out_len, filler_id if label_filler else CROSS_ENTROPY_IGNORE_IDX, dtype=np.int64
    )
    out[real] = tokens
    out_labels[real] = labels
    return out, out_labels


def dilated_dataset(
    documents_or_tokenizer: Any,
    source: Any = None,
    *,
    every_n_tokens: int = 1,
    filler_tokens: int = 1,
    filler_id: Optional[int] = None,
    label_filler: bool = False,
    **builder_kwargs: Any,
) -> TokenizedDocuments:
    """Documents dilated with filler tokens.

    Args:
        documents_or_tokenizer: a TokenizedDocuments, or a tokenizer (then ``source`` and
            ``builder_kwargs`` go to :func:`long_text_dataset`).
        source: see :func:`long_text_dataset`.
        every_n_tokens (int): real tokens between insertions (1: after every token).
        filler_tokens (int): filler tokens per insertion.
        filler_id (Optional[int]): the filler id; default the tokenizer's ``pad_id`` (when it
            is a valid id).
        label_filler (bool): train on predicting the filler too (default: filler positions
            are -100, so the loss covers the real tokens only).

    Returns:
        TokenizedDocuments: same documents and fields, dilated, with labels.
    """
    docs = _resolve(documents_or_tokenizer, source, builder_kwargs)
    for name, value in (("every_n_tokens", every_n_tokens), ("filler_tokens", filler_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if filler_id is None:
        pad = getattr(documents_or_tokenizer, "pad_id", None)
        if not isinstance(pad, int) or pad < 0:
            raise ValueError("give filler_id= (the tokenizer has no usable pad_id).")
        filler_id = pad
    vocab = docs.vocab_size or vocab_size_of(documents_or_tokenizer)
    check_ids(np.array([filler_id]), vocab, "filler_id")
    source_labels = docs.labels if docs.labels is not None else docs.tokens
    out_tokens, out_labels = [], []
    for i in range(len(docs)):
        start, stop = _body(docs, i)
        body = np.asarray(docs.tokens[start:stop], np.int64)
        body_labels = np.asarray(source_labels[start:stop], np.int64)
        tokens, labels = dilate(
            body,
            body_labels,
            every_n_tokens=every_n_tokens,
            filler_tokens=filler_tokens,
            filler_id=filler_id,
            label_filler=label_filler,
        )
        tokens, labels = _wrap(docs, tokens, labels)
        out_tokens.append(tokens)
        out_labels.append(labels)
    return TokenizedDocuments.from_sequences(
        out_tokens,
        labels=out_labels,
        fields=docs.fields,
        vocab_size=docs.vocab_size,
        bos_id=docs.bos_id,
        eos_id=docs.eos_id,
    )
