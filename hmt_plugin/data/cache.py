"""On-disk cache of tokenized corpora, so a second run does not tokenize again.

An entry is a directory ``<cache_dir>/<key>/`` holding

* ``tokens.npy``: ``[N]`` uint32, all documents back to back (opened memory-mapped);
* ``offsets.npy``: ``[D + 1]`` int64 document starts, then N;
* ``names.json``: where each document came from;
* ``meta.json``: counts and the description the key was made from (written last).

Entries are written under a temporary name and moved into place with ``os.replace``, so
a reader never sees half an entry and two processes building the same entry do not clash.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "HMT_CACHE_DIR"
# Bump when the stored layout or the tokenization pipeline changes meaning.
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
# The .npy header of a 1-D uint32 array with up to 13-digit length is exactly 128 bytes, so
# the header can be written after the data is streamed (its length is then known).
_HEADER_BYTES = 128


def default_cache_dir() -> Path:
    """``$HMT_CACHE_DIR`` if set, else ``~/.cache/hmt_plugin``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hmt_plugin"


def resolve_cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def file_signature(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What identifies a source file's content cheaply: absolute path, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(description: Mapping[str, Any]) -> str:
    """A stable hex key for a JSON-serialisable description of sources, tokenizer and options."""
    text = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def _npy_header(length: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": TOKEN_DTYPE.str, "fortran_order": False, "shape": (int(length),)}
    )
    return buf.getvalue()


class CachedTokens:
    """A loaded cache entry: memory-mapped tokens, offsets, names and metadata."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path / "meta.json", encoding="utf-8") as f:
            self.meta: Dict[str, Any] = json.load(f)
        self.tokens: np.ndarray = np.load(path / "tokens.npy", mmap_mode="r")
        self.offsets: np.ndarray = np.load(path / "offsets.npy")
        names_path = path / "names.json"
        self.names: Optional[List[str]] = None
        if names_path.exists():
            with open(names_path, encoding="utf-8") as f:
                self.names = json.load(f)
        if (
            int(self.offsets[-1]) != self.tokens.shape[0]
            or self.meta.get("format") != FORMAT_VERSION
        ):
            raise ValueError(f"inconsistent cache entry {path}")


def load_cached(cache_dir: Path, key: str) -> Optional[CachedTokens]:
    """The entry for ``key``, or None. A damaged entry is removed (and rebuilt by the caller)."""
    path = cache_dir / key
    if not (path / "meta.json").exists():
        return None
    try:
        return CachedTokens(path)
    except (OSError, ValueError) as err:
        log.warning("Ignoring damaged token cache entry %s (%s); tokenizing again.", path, err)
        shutil.rmtree(path, ignore_errors=True)
        return None


class TokenCacheWriter:
    """Streams documents' token ids to a new cache entry without holding them in memory.

    Usage::

        with TokenCacheWriter(cache_dir, key) as writer:
            for ids in documents:
                writer.append(ids, name)
            entry = writer.commit(meta)

    Leaving the block without ``commit`` (an error) deletes the partial entry.
    """

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.cache_dir = cache_dir
        self.key = key
        self.tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lengths: List[int] = []
        self.names: List[str] = []
        self.num_tokens = 0
        self._file = None

    def __enter__(self) -> "TokenCacheWriter":
        try:
            self.tmp.mkdir(parents=True)
        except OSError as err:
            raise OSError(
                f"cannot create the token cache under {self.cache_dir} ({err}); set cache_dir= "
                f"or the {CACHE_ENV} environment variable to a writable directory."
            ) from err
        self._file = open(self.tmp / "tokens.npy", "wb")
        self._file.write(b"\0" * _HEADER_BYTES)
        return self

    def append(self, ids: np.ndarray, name: str) -> None:
        """Add one document; ``ids`` must already be checked to fit in uint32."""
        self._file.write(np.ascontiguousarray(ids, dtype=TOKEN_DTYPE).tobytes())
        self.lengths.append(int(ids.shape[0]))
        self.names.append(name)
        self.num_tokens += int(ids.shape[0])

    def commit(self, meta: Mapping[str, Any]) -> CachedTokens:
        """Finish the files and move the entry into place; returns it opened."""
        header = _npy_header(self.num_tokens)
        if len(header) != _HEADER_BYTES:  # only for absurd lengths; never in practice
            raise ValueError(
                f"corpus of {self.num_tokens} tokens is too large for the cache format."
            )
        self._file.seek(0)
        self._file.write(header)
        self._file.close()
        self._file = None
        offsets = np.concatenate([[0], np.cumsum(np.asarray(self.lengths, dtype=np.int64))])
        np.save(self.tmp / "offsets.npy", offsets.astype(np.int64))
        with open(self.tmp / "names.json", "w", encoding="utf-8") as f:
            json.dump(self.names, f)
        with open(self.tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT_VERSION, **meta}, f, indent=1, default=str)
        final = self.cache_dir / self.key
        try:
            os.replace(self.tmp, final)
        except OSError:
            # Another process finished the same entry first; its content is the same.
            shutil.rmtree(self.tmp, ignore_errors=True)
        return CachedTokens(final)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
