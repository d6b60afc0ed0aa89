"""Long-document language modelling data: books, articles, any text corpus, from local files
or a Hugging Face dataset, tokenized once and cached."""

import logging
import os
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

from hmt_plugin.data.cache import file_signature
from hmt_plugin.data.documents import TokenizedDocuments
from hmt_plugin.data.gutenberg import strip_gutenberg as _strip_gutenberg
from hmt_plugin.data.text_sources import (
    DataSourceError,
    SUPPORTED_SUFFIXES,
    NamedText,
    iter_local_documents,
    list_local_files,
)
from hmt_plugin.data.tokenization import tokenize_documents
from hmt_plugin.data.wikitext import split_wikitext_articles

log = logging.getLogger(__name__)

ARTICLE_SPLITS = ("auto", "wikitext", None)
_HF_BATCH = 1000


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    )


def _looks_like_path(source: Union[str, os.PathLike]) -> bool:
    """A source meant as a local path (a hub name like 'emozilla/pg19' is none of these)."""
    text = str(source)
    return (
        isinstance(source, os.PathLike)
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.lower().endswith(SUPPORTED_SUFFIXES)
    )


def _describe_data_files(data_files: Any) -> Any:
    """``data_files`` for the cache key, local files replaced by their signatures."""
    if data_files is None:
        return None
    if isinstance(data_files, (str, os.PathLike)):
        p = Path(data_files).expanduser()
        return file_signature(p) if p.is_file() else str(data_files)
    if isinstance(data_files, dict):
        return {str(k): _describe_data_files(v) for k, v in sorted(data_files.items())}
    return [_describe_data_files(v) for v in data_files]


def _resolve_article_split(article_split: Optional[str], *names: Any) -> Optional[str]:
    if article_split not in ARTICLE_SPLITS:
        raise ValueError(
            f"article_split={article_split!r}: use 'auto', 'wikitext' or None (no splitting)."
        )
    if article_split == "auto":
        hay = " ".join(str(n) for n in names if n is not None).lower()
        return "wikitext" if "wikitext" in hay else None
    return article_split


def _prepare(
    docs: Iterable[NamedText], *, strip_gutenberg: bool, article_split: Optional[str]
) -> Iterator[NamedText]:
    """Gutenberg stripping and article splitting of a stream of documents."""
    for name, text in docs:
        if text is not None and strip_gutenberg:
            text = _strip_gutenberg(text)
        if text is not None and article_split == "wikitext":
            for k, article in enumerate(split_wikitext_articles(text.splitlines(keepends=True))):
                yield f"{name}#article{k}", article
        else:
            yield name, text


def _hf_rows(ds: Iterable[Dict[str, Any]], column: str, label: str) -> Iterator[NamedText]:
    for row_index, row in enumerate(ds):
        if column not in row:
            raise DataSourceError(
                f"{label}: no column {column!r}; available columns: {sorted(row)}. Set column= "
                "to the text column."
            )
        value = row[column]
        if value is not None and not isinstance(value, str):
            raise DataSourceError(
                f"{label}: column {column!r} holds {type(value).__name__}, not text; set column=."
            )
        yield f"{label}:{row_index}", value


def _hf_batched_rows(ds: Any, column: str, label: str) -> Iterator[NamedText]:
    """Rows of an in-memory (Arrow) dataset, read a batch at a time."""
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=_HF_BATCH):
        for value in batch[column]:
            if value is not None and not isinstance(value, str):
                raise DataSourceError(
                    f"{label}:{row}: column {column!r} holds {type(value).__name__}, not text; "
                    "set column=."
                )
            yield f"{label}:{row}", value
            row += 1


def _check_columns(columns: Optional[List[str]], column: str, label: str) -> None:
    if columns is not None and column not in columns:
        raise DataSourceError(
            f"{label}: no column {column!r}; available columns: {columns}. Set column= to the "
            "text column."
        )


def _grouped_rows(
    rows: Iterator[NamedText], article_split: Optional[str], label: str
) -> Iterator[NamedText]:
    """Rows as documents, or (WikiText) rows as lines grouped into articles."""
    if article_split != "wikitext":
        return rows
    lines = (text or "" for _, text in rows)
    return ((f"{label}#article{k}", a) for k, a in enumerate(split_wikitext_articles(lines)))


def long_text_dataset(
    tokenizer: Any,
    source: Union[str, os.PathLike],
    *,
    name: Optional[str] = None,
    split: str = "train",
    column: str = "text",
    data_files: Any = None,
    streaming: bool = False,
    max_documents: Optional[int] = None,
    strip_gutenberg: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
    cache_dir: Optional[str] = None,
    concatenate: bool = False,
    article_split: Optional[str] = "auto",
    num_workers: int = 0,
    hf_cache_dir: Optional[str] = None,
    progress: bool = True,
    **load_dataset_kwargs: Any,
) -> TokenizedDocuments:
    """Whole documents for long-context language modelling, tokenized once and cached.

    Usable as a ``_component_`` (the recipe passes the tokenizer first)::

        dataset:
          _component_: hmt_plugin.data.long_text_dataset
          source: emozilla/pg19          # or wikitext (name: wikitext-103-raw-v1), json, a path
          split: train
          streaming: true
          max_documents: 1000

    Args:
        tokenizer: a torchtune tokenizer (Llama 2 SentencePiece, Llama 3 tiktoken, Qwen2, ...).
        source (str): a local path or a Hugging Face dataset. A local path is a directory
            (searched recursively for ``.txt`` files, one document each, and ``.jsonl`` /
            ``.parquet`` files, one document per row; ``split`` is not used), one such file, or a
            ``save_to_disk`` directory. Anything else goes to ``datasets.load_dataset(source,
            name, split=split, data_files=data_files, ...)``: a hub name (``"emozilla/pg19"``,
            ``"wikitext"``) or a builder (``"json"``, ``"parquet"``, ``"text"``).
        name (Optional[str]): the dataset configuration (``"wikitext-103-raw-v1"``).
        split (str): the split to read (Hugging Face slicing such as ``"train[:100]"`` works
            without streaming).
        column (str): the column holding the text (jsonl, parquet, Hugging Face).
        data_files: passed to ``load_dataset``.
        streaming (bool): stream the Hugging Face dataset instead of downloading it all;
            use with ``max_documents`` for a slice of a large set.
        max_documents (Optional[int]): keep the first this many documents (after article
            splitting; empty ones count and are then skipped).
        strip_gutenberg (bool): remove Project Gutenberg headers, small print and license
            (modern and 1990s styles, see :func:`~hmt_plugin.data.strip_gutenberg`).
        add_bos / add_eos (bool): put the tokenizer's BOS / EOS around each document
            (tokenizers without one, like Qwen2's BOS, skip it).
        cache_dir (Optional[str]): token cache root; default ``$HMT_CACHE_DIR`` or
            ``~/.cache/hmt_plugin``. The key covers the source files (path, size, mtime) or the
            Hugging Face fingerprint, the tokenizer (class, model content) and these options.
        concatenate (bool): join all documents into one stream, so training windows may cross
            document boundaries (BOS/EOS stay in as separators). Default: documents kept apart.
        article_split (Optional[str]): ``"wikitext"`` splits WikiText (files or rows) into
            articles at top-level `` = Title = `` headings; ``"auto"`` does so when the source
            or ``name`` mentions wikitext; None keeps files/rows as they are.
        num_workers (int): tokenize in this many forked processes (0: in this process).
        hf_cache_dir (Optional[str]): ``cache_dir`` of ``load_dataset`` (Hugging Face's cache).
        progress (bool): show a progress bar while tokenizing.
        **load_dataset_kwargs: anything else for ``load_dataset`` (``revision``, ...).

    Returns:
        TokenizedDocuments: items ``{"tokens": int64 [n]}``; ``skipped_empty`` counts the
        empty documents dropped.

    Raises:
        DataSourceError: missing path, empty directory, non-UTF-8 file, missing column.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents={max_documents} must be a positive integer or None.")
    options = {
        "column": column,
        "max_documents": max_documents,
        "strip_gutenberg": strip_gutenberg,
    }
    local = Path(source).expanduser()
    if not local.exists() and _looks_like_path(source):
        raise DataSourceError(
            f"{local} does not exist. Give an existing file or directory, or a Hugging Face "
            "dataset name such as 'emozilla/pg19'."
        )
    if local.exists() and not _is_saved_dataset(local):
        docs = _local_documents(
            tokenizer,
            local,
            options,
            article_split,
            add_bos,
            add_eos,
            cache_dir,
            num_workers,
            progress,
        )
    else:
        docs = _hf_documents(
            tokenizer,
            str(source),
            name,
            split,
            data_files,
            streaming,
            options,
            article_split,
            add_bos,
            add_eos,
            cache_dir,
            num_workers,
            progress,
            hf_cache_dir,
            load_dataset_kwargs,
        )
    return docs.concatenated() if concatenate else docs


def _limited(stream: Iterable[NamedText], max_documents: Optional[int]) -> Iterator[NamedText]:
    return iter(stream) if max_documents is None else islice(stream, max_documents)


def _local_documents(
    tokenizer, path, options, article_split, add_bos, add_eos, cache_dir, num_workers, progress
) -> TokenizedDocuments:
    files = list_local_files(path)
    split_mode = _resolve_article_split(article_split, path, *files)
    column = options["column"]

    def named_texts() -> Iterator[NamedText]:
        docs = _prepare(
            iter_local_documents(files, column),
            strip_gutenberg=options["strip_gutenberg"],
            article_split=split_mode,
        )
        return _limited(docs, options["max_documents"])

    all_txt = all(f.suffix.lower() == ".txt" for f in files)
    total = len(files) if all_txt and split_mode is None else None
    if total is not None and options["max_documents"] is not None:
        total = min(total, options["max_documents"])
    description = {
        "kind": "local",
        "source": str(path),
        "files": [file_signature(f) for f in files],
        "article_split": split_mode,
        **options,
    }
    return tokenize_documents(
        tokenizer,
        named_texts,
        description=description,
        add_bos=add_bos,
        add_eos=add_eos,
        cache_dir=cache_dir,
        total=total,
        num_workers=num_workers,
        progress=progress,
    )


def _open_saved(path: Path, split: str) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(
                f"{path} has no split {split!r}; available splits: {list(ds)}. Set split=."
            )
        ds = ds[split]
    return ds


def _hf_documents(
    tokenizer,
    source,
    name,
    split,
    data_files,
    streaming,
    options,
    article_split,
    add_bos,
    add_eos,
    cache_dir,
    num_workers,
    progress,
    hf_cache_dir,
    load_kwargs,
) -> TokenizedDocuments:
    import datasets

    column, max_documents = options["column"], options["max_documents"]
    split_mode = _resolve_article_split(article_split, source, name)
    label = f"{source}" + (f"/{name}" if name else "") + f"[{split}]"
    prepare = dict(strip_gutenberg=options["strip_gutenberg"], article_split=None)

    def load(stream: bool) -> Any:
        local = Path(source).expanduser()
        if _is_saved_dataset(local):
            ds = _open_saved(local, split)
            return ds.to_iterable_dataset() if stream else ds
        if hf_cache_dir is not None:
            load_kwargs.setdefault("cache_dir", hf_cache_dir)
        return datasets.load_dataset(
            source, name, split=split, data_files=data_files, streaming=stream, **load_kwargs
        )

    if streaming:
        # The key is known without loading, so a cached run needs no network.
        description = {
            "kind": "hf-stream",
            "source": source,
            "name": name,
            "split": split,
            "data_files": _describe_data_files(data_files),
            "load_kwargs": {k: repr(v) for k, v in sorted(load_kwargs.items())},
            "article_split": split_mode,
            **options,
        }

        def named_texts() -> Iterator[NamedText]:
            ds = load(stream=True)
            _check_columns(getattr(ds, "column_names", None), column, label)
            if split_mode is None and max_documents is not None:
                ds = ds.take(max_documents)
            rows = _grouped_rows(_hf_rows(ds, column, label), split_mode, label)
            return _limited(_prepare(rows, **prepare), max_documents)

        total = max_documents
    else:
        ds = load(stream=False)
        if not hasattr(ds, "select_columns"):
            raise DataSourceError(
                f"{label}: load_dataset returned {type(ds).__name__}, not one split; set split=."
            )
        _check_columns(ds.column_names, column, label)
        if split_mode is None and max_documents is not None:
            ds = ds.select(range(min(max_documents, len(ds))))
        description = {
            "kind": "hf",
            "source": source,
            "name": name,
            "split": split,
            "fingerprint": getattr(ds, "_fingerprint", None),
            "data_files": _describe_data_files(data_files),
            "article_split": split_mode,
            **options,
        }

        def named_texts() -> Iterator[NamedText]:
            rows = _grouped_rows(_hf_batched_rows(ds, column, label), split_mode, label)
            return _limited(_prepare(rows, **prepare), max_documents)

        total = len(ds) if split_mode is None else None
    return tokenize_documents(
        tokenizer,
        named_texts,
        description=description,
        add_bos=add_bos,
        add_eos=add_eos,
        cache_dir=cache_dir,
        total=total,
        num_workers=num_workers,
        progress=progress,
    )
