"""What the data pipeline needs from any torchtune tokenizer: ids, vocabulary size, and a
fingerprint that identifies the tokenizer for the cache."""

import hashlib
import json
import weakref
from typing import Any, Iterator, Optional

import numpy as np

# Text run through the tokenizer as part of its fingerprint: catches settings that the
# model-file hash does not cover (special tokens, normalisation, BOS/EOS handling).
_PROBE = (
    "The Project Gutenberg EBook of Emma, by Jane Austen.\n\n  Chapter I\n"
    "\u201cQuite so,\u201d said he \u2014 1815; caf\u00e9 na\u00efve \u00fcber "
    "\u4e2d\u6587 <s></s> \t\tend."
)

_fingerprints: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def vocab_size_of(tokenizer: Any) -> Optional[int]:
    """Number of ids the tokenizer can produce, or None if it does not say.

    torchtune's SentencePiece and tiktoken tokenizers have ``vocab_size``; its Qwen2 tokenizer
    has an ``encoder`` and ``special_tokens`` instead."""
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict) and encoder:
        top = max(encoder.values())
        special = getattr(tokenizer, "special_tokens", None) or {}
        if special:
            top = max(top, max(special.values()))
        return int(top) + 1
    return None


def encode(tokenizer: Any, text: str, *, add_bos: bool, add_eos: bool) -> np.ndarray:
    """``tokenizer.encode`` as an int64 array. Tokenizers without a BOS (Qwen2) skip it."""
    return np.asarray(tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos), dtype=np.int64)


def check_ids(ids: np.ndarray, vocab_size: Optional[int], where: str) -> None:
    """Raise if any id is negative or not below ``vocab_size`` (checked with numpy)."""
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(
            f"{where}: token ids span [{low}, {high}] but the tokenizer vocabulary is "
            f"[0, {vocab_size}). The tokenizer returned ids it does not own; check its model file "
            "and special-token settings."
        )


def _model_contents(tokenizer: Any) -> Iterator[bytes]:
    """Bytes that define the tokenizer's model, found by looking at its known attributes."""
    seen = set()
    stack = [tokenizer]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if hasattr(obj, "serialized_model_proto"):  # sentencepiece.SentencePieceProcessor
            yield obj.serialized_model_proto()
            continue
        if type(obj).__module__.startswith("tokenizers") and hasattr(obj, "to_str"):
            yield obj.to_str().encode()  # tokenizers.Tokenizer: the whole tokenizer.json
            continue
        ranks = getattr(obj, "_mergeable_ranks", None)  # tiktoken.Encoding
        if isinstance(ranks, dict):
            h = hashlib.sha256()
            for piece, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                h.update(piece)
                h.update(rank.to_bytes(4, "little"))
            yield h.digest()
            special = getattr(obj, "_special_tokens", {})
            yield json.dumps(sorted(special.items())).encode()
            continue
        encoder = getattr(obj, "encoder", None)  # Qwen2 byte-level BPE
        if isinstance(encoder, dict):
            yield json.dumps(encoder, sort_keys=True).encode()
            ranks = getattr(obj, "bpe_ranks", None)
            if isinstance(ranks, dict):
                yield json.dumps(sorted((" ".join(k), v) for k, v in ranks.items())).encode()
        for name in ("_spm_model", "spm_model", "tt_model", "_tokenizer", "tokenizer"):
            child = getattr(obj, name, None)
            if child is not None and not isinstance(child, (str, int, float)):
                stack.append(child)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hex digest identifying a tokenizer: its class, the content of its model (the
    SentencePiece proto, tiktoken ranks, BPE vocabulary or ``tokenizer.json``, whichever it
    has), its special ids
    and the ids it gives a probe text."""
    try:
        cached = _fingerprints.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    h = hashlib.sha256()
    cls = type(tokenizer)
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    for chunk in _model_contents(tokenizer):
        h.update(hashlib.sha256(chunk).digest())
    ids = (
        getattr(tokenizer, "bos_id", None),
        getattr(tokenizer, "eos_id", None),
        getattr(tokenizer, "pad_id", None),
        vocab_size_of(tokenizer),
    )
    h.update(repr(ids).encode())
    h.update(encode(tokenizer, _PROBE, add_bos=True, add_eos=True).tobytes())
    digest = h.hexdigest()[:40]
    try:
        _fingerprints[tokenizer] = digest
    except TypeError:
        pass
    return digest
