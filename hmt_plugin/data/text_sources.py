"""Reading documents from local files: ``.txt`` (one document per file), ``.jsonl`` and
``.parquet`` (one document per row, text in a named column).

Every reader yields ``(name, text)`` pairs; ``name`` says where the text came from
(``path`` or ``path:row``) so later messages can point at it. Errors name the file and say
how to fix it.
"""

import json
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

NamedText = Tuple[str, Optional[str]]

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


class DataSourceError(ValueError):
    """Bad input data; the message names the file/column and how to fix it."""


def list_local_files(path: Union[str, os.PathLike]) -> List[Path]:
    """The data files under ``path`` (itself if it is a file), sorted by path.

    Directories are searched recursively for ``.txt``, ``.jsonl`` and ``.parquet`` files;
    hidden files and folders (``.git``, ``.cache``) are skipped."""
    root = Path(path).expanduser()
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataSourceError(
                f"{root}: unsupported file type {root.suffix!r}; use .txt (one document per "
                "file), .jsonl or .parquet (one document per row)."
            )
        return [root]
    if not root.is_dir():
        raise DataSourceError(f"{root} does not exist.")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            if not fname.startswith(".") and Path(fname).suffix.lower() in SUPPORTED_SUFFIXES:
                files.append(Path(dirpath) / fname)
    if not files:
        present = sorted(p.name for p in root.iterdir())[:10]
        raise DataSourceError(
            f"{root} holds no .txt, .jsonl or .parquet files (found: {present or 'nothing'}). "
            "Point source= at a directory of such files, or at one file."
        )
    return sorted(files)


def read_text_file(path: Path) -> str:
    """The whole file as text (UTF-8, BOM dropped, CRLF/CR turned into LF)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        # NUL bytes are valid UTF-8 but no text file holds them: a binary file (an image, an
        # archive) that happens to decode must not be trained on. git uses the same test.
        raise DataSourceError(
            f"{path} looks binary (it holds NUL bytes), not text. Remove it from the folder, or "
            "point source= at the text files only."
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}). "
            f"Convert it, e.g. `iconv -f latin1 -t utf-8 '{path}' > fixed.txt`, or remove it."
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _column_text(value: object, column: str, where: str) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise DataSourceError(
        f"{where}: column {column!r} holds a {type(value).__name__}, not text; pick the text "
        "column with column=."
    )


def iter_jsonl(path: Path, column: str) -> Iterator[NamedText]:
    """One document per JSON object line, text from ``column``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataSourceError(
                    f"{path}: line {lineno} is not UTF-8. Re-encode the file as UTF-8 "
                    "(e.g. with iconv) or remove it."
                ) from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{where}: not valid JSON ({err.msg}).") from None
            if not isinstance(row, dict):
                raise DataSourceError(f"{where}: expected a JSON object per line.")
            if column not in row:
                raise DataSourceError(
                    f"{where}: no column {column!r}; available columns: {sorted(row)}. "
                    "Set column= to the text column."
                )
            yield where, _column_text(row[column], column, where)


def iter_parquet(path: Path, column: str) -> Iterator[NamedText]:
    """One document per row, text from ``column`` (read in record batches)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise DataSourceError(
            f"{path}: no column {column!r}; available columns: {names}. Set column= to the "
            "text column."
        )
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield f"{path}:{row}", _column_text(value, column, f"{path}:{row}")
            row += 1


def iter_local_documents(files: List[Path], column: str) -> Iterator[NamedText]:
    """Documents of all ``files`` in order."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield str(path), read_text_file(path)
        elif suffix in JSONL_SUFFIXES:
            yield from iter_jsonl(path, column)
        else:
            yield from iter_parquet(path, column)
