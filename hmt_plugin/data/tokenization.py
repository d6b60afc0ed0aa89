"""Tokenize a stream of documents once, into the on-disk cache, and open the result
memory-mapped. Empty documents are skipped and counted; every id is checked against the
tokenizer's vocabulary."""

import logging
import multiprocessing
import time
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from hmt_plugin.data.cache import (
    CachedTokens,
    TokenCacheWriter,
    cache_key,
    load_cached,
    resolve_cache_dir,
)
from hmt_plugin.data.documents import TokenizedDocuments
from hmt_plugin.data.text_sources import NamedText
from hmt_plugin.data.tokenizer_utils import (
    check_ids,
    encode,
    tokenizer_fingerprint,
    vocab_size_of,
)

log = logging.getLogger(__name__)

# The tokenizer seen by forked workers (inherited, so it never needs to be pickled).
_WORKER: Dict[str, Any] = {}


def _encode_named(item: NamedText) -> Tuple[str, Optional[np.ndarray]]:
    name, text = item
    if text is None or not text.strip():
        return name, None
    ids = encode(_WORKER["tokenizer"], text, add_bos=_WORKER["add_bos"], add_eos=_WORKER["add_eos"])
    return name, ids


def _encode_stream(
    tokenizer: Any,
    named_texts: Iterable[NamedText],
    *,
    add_bos: bool,
    add_eos: bool,
    num_workers: int,
) -> Iterator[Tuple[str, Optional[np.ndarray]]]:
    """``(name, ids)`` per document in order; ids is None for an empty document."""
    _WORKER.update(tokenizer=tokenizer, add_bos=add_bos, add_eos=add_eos)
    try:
        if num_workers <= 0 or "fork" not in multiprocessing.get_all_start_methods():
            if num_workers > 0:
                log.warning(
                    "num_workers=%d needs the 'fork' start method; tokenizing in this process.",
                    num_workers,
                )
            yield from map(_encode_named, named_texts)
            return
        ctx = multiprocessing.get_context("fork")
        it = iter(named_texts)
        # Feed the pool a few documents at a time: Pool.imap would read the whole corpus ahead.
        with ctx.Pool(num_workers) as pool:
            while True:
                chunk = list(islice(it, 4 * num_workers))
                if not chunk:
                    break
                yield from pool.map(_encode_named, chunk, chunksize=1)
    finally:
        _WORKER.clear()


def _documents_from_entry(
    entry: CachedTokens, vocab_size: Optional[int], bos_id: Optional[int], eos_id: Optional[int]
) -> TokenizedDocuments:
    return TokenizedDocuments(
        entry.tokens,
        entry.offsets,
        names=entry.names,
        skipped_empty=int(entry.meta.get("skipped_empty", 0)),
        vocab_size=vocab_size,
        bos_id=bos_id,
        eos_id=eos_id,
    )


def tokenize_documents(
    tokenizer: Any,
    named_texts: Callable[[], Iterable[NamedText]],
    *,
    description: Mapping[str, Any],
    add_bos: bool = True,
    add_eos: bool = True,
    cache_dir: Optional[str] = None,
    total: Optional[int] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> TokenizedDocuments:
    """Tokenize documents into the cache (or open the cached result).

    Args:
        tokenizer: any torchtune tokenizer (``encode(text, add_bos=, add_eos=)``).
        named_texts: called only on a cache miss; yields ``(name, text)`` per document, text
            None or blank for an empty document.
        description (Mapping): JSON-serialisable identity of the sources and options; with the
            tokenizer fingerprint it forms the cache key.
        add_bos / add_eos (bool): put the tokenizer's BOS / EOS around each document.
        cache_dir (Optional[str]): cache root; default ``$HMT_CACHE_DIR`` or
            ``~/.cache/hmt_plugin``.
        total (Optional[int]): documents expected, for the progress bar.
        num_workers (int): tokenize in this many forked processes (0: in this process).
        progress (bool): show a tqdm progress bar while tokenizing.

    Returns:
        TokenizedDocuments: memory-mapped uint32 tokens, one document per non-empty text.
    """
    vocab = vocab_size_of(tokenizer)
    bos_id = getattr(tokenizer, "bos_id", None) if add_bos else None
    eos_id = getattr(tokenizer, "eos_id", None) if add_eos else None
    key_parts = {
        **description,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "add_bos": add_bos,
        "add_eos": add_eos,
    }
    key = cache_key(key_parts)
    root = resolve_cache_dir(cache_dir)
    entry = load_cached(root, key)
    if entry is not None:
        docs = _documents_from_entry(entry, vocab, bos_id, eos_id)
        log.info(
            "Loaded %d documents (%d tokens) from the token cache %s; %d empty documents were "
            "skipped when it was built.",
            len(docs),
            docs.num_tokens,
            entry.path,
            docs.skipped_empty,
        )
        return docs

    started = time.perf_counter()
    skipped = []
    bar = tqdm(total=total, unit=" docs", desc="Tokenizing", disable=not progress, leave=False)
    with TokenCacheWriter(root, key) as writer:
        stream = _encode_stream(
            tokenizer, named_texts(), add_bos=add_bos, add_eos=add_eos, num_workers=num_workers
        )
        for name, ids in stream:
            bar.update(1)
            if ids is None:
                skipped.append(name)
                continue
            check_ids(ids, vocab, name)
            writer.append(ids, name)
            bar.set_postfix(tokens=writer.num_tokens, refresh=False)
        bar.close()
        if not writer.lengths:
            raise ValueError(
                f"no non-empty documents in {description.get('source', 'the source')} "
                f"({len(skipped)} empty ones were skipped); check the path, split and column."
            )
        seconds = time.perf_counter() - started
        entry = writer.commit(
            {
                "num_documents": len(writer.lengths),
                "num_tokens": writer.num_tokens,
                "skipped_empty": len(skipped),
                "vocab_size": vocab,
                "seconds": round(seconds, 3),
                "description": key_parts,
            }
        )
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        log.warning("Skipped %d empty documents (%s).", len(skipped), shown)
    docs = _documents_from_entry(entry, vocab, bos_id, eos_id)
    log.info(
        "Tokenized %d documents (%d tokens) in %.1f s (%.0f tokens/s); cached at %s.",
        len(docs),
        docs.num_tokens,
        seconds,
        docs.num_tokens / max(seconds, 1e-9),
        entry.path,
    )
    return docs
