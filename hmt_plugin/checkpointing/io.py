"""Reading and writing checkpoint files: the layer every format module writes through.

* **Atomic writes.** A file is written to a temporary name in its directory and renamed into
  place (:func:`atomic_write`), so a kill or a full disk never leaves a half-written file
  under the real name.
* **Staging directories.** A checkpoint directory is written into ``.<name>.partial`` beside
  it and moved into place only when complete (:func:`staged`, :func:`move_into_place`).
* **Tensors one at a time.** A 7B checkpoint is ~13 GiB in bf16; a converter that loads it,
  converts it into a new dict and then saves that dict holds it twice. The input is opened
  lazily (:class:`TensorSource`: ``safe_open`` for safetensors, ``torch.load(mmap=True)`` for
  pickled state dicts, whose tensors stay on disk until touched) and the output is written
  in HF-style shards of bounded size (:class:`ShardWriter`), so a conversion holds at most
  one shard besides what it is converting.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from torchtune.training.checkpointing._utils import SAFETENSOR_INDEX_FNAME, SHARD_FNAME

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Files in a checkpoint directory that hold tensors but are not the backbone's weights: ours
# (hmt_files), the published tensors our model has no use for, and LoRA adapters.
HMT_WEIGHTS = "hmt_model.safetensors"
PUBLISHED_EXTRAS = "published_extras.safetensors"
ADAPTER_PT = "adapter_model.pt"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_PT, ADAPTER_SAFETENSORS, "adapter_model.bin")
NOT_BACKBONE = {HMT_WEIGHTS, PUBLISHED_EXTRAS, *ADAPTER_FILES}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

# safetensors' dtype names (``get_slice(...).get_dtype()``) -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


class HMTCheckpointError(ValueError):
    """An HMT checkpoint that is missing, damaged or does not fit the model."""


class ConversionError(HMTCheckpointError):
    """A checkpoint that cannot be converted. The message names the file or the key."""


@dataclass
class ConversionResult:
    """What a converter wrote.

    Attributes:
        output (Path): the output file or directory.
        notes (List[str]): decisions the converter made that the user should know about
            (defaults used, values invented, settings the published code does not have).
    """

    output: Path
    notes: List[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        log.info(message)
        self.notes.append(message)



# ----------------------------------------------------------------------------- atomic writes
def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write`` on a temporary name beside ``path``, then rename it to ``path``; on
    failure (disk full, a kill, ...) the temporary file is removed and the previous file at
    ``path`` is untouched.

    Args:
        path: the file to write.
        write: writes the content to the path it is given (``torch.save``, ``save_file``, ...).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """:func:`atomic_write` of ``data``, synced to the disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """:func:`atomic_write` with ``torch.save`` (the parent directory is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: PathLike, metadata: Dict[str, str]) -> Path:
    """:func:`atomic_write` with safetensors' ``save_file``."""
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ----------------------------------------------------------------------------- staging
@contextlib.contextmanager
def staged(target: PathLike) -> Iterator[Path]:
    """Yield an empty staging directory ``.<target name>.partial`` beside ``target`` (a
    leftover of a killed write is replaced) and remove it when the block ends, whether it
    succeeds or fails; the block moves what it wrote into place with :func:`move_into_place`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(source: Path, target: Path, *, merge: bool) -> None:
    """Move the directory ``source`` to ``target``.

    Args:
        merge: with ``target`` present, ``source``'s entries replace their namesakes in it and
            the others stay; otherwise the whole directory is replaced, the old one removed
            only once the new one is in place.
    """
    if not target.exists():
        os.replace(source, target)
    elif merge:
        for item in source.iterdir():
            destination = target / item.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(item, destination)
    else:
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(output: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A converter's output: yield a staging directory (:func:`staged`) and merge its files
    into ``output`` only when the block succeeds, so a failed conversion never leaves a
    half-written checkpoint.

    Raises:
        ConversionError: ``output`` is a non-empty directory and ``overwrite`` is False.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConversionError(f"{output} exists and is not a directory.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"{output} is not empty; choose another output or pass overwrite (--overwrite).")
    with staged(output) as stage:
        yield stage
        move_into_place(stage, output, merge=True)


# ----------------------------------------------------------------------------- reading
class TensorSource:
    """A state dict spread over one or more files, read one tensor at a time.

    Shapes and dtypes come from the file headers (safetensors) or from memory-mapped
    tensors (``torch.load(mmap=True)``), so validating a whole checkpoint touches no data.
    """

    def __init__(self) -> None:
        self._where: Dict[str, Path] = {}
        self._safetensors: Dict[Path, Any] = {}
        self._pickled: Dict[Path, Mapping[str, torch.Tensor]] = {}

    # -- building
    def add_file(self, path: Path) -> None:
        """Index the tensors of one file (``.safetensors``, or a pickled state dict)."""
        if path.suffix == ".safetensors":
            handle = _open_safetensors(path)
            self._safetensors[path] = handle
            keys = list(handle.keys())
        else:
            state_dict = _load_pickled_state_dict(path)
            self._pickled[path] = state_dict
            keys = list(state_dict.keys())
        for key in keys:
            if key in self._where:
                raise ConversionError(
                    f"{key!r} is stored twice, in {self._where[key]} and in {path}; the "
                    "checkpoint's files do not belong together."
                )
            self._where[key] = path

    # -- reading
    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> Tuple[int, ...]:
        path = self._where[key]
        if path in self._safetensors:
            return tuple(self._safetensors[path].get_slice(key).get_shape())
        return tuple(self._pickled[path][key].shape)

    def dtype(self, key: str) -> torch.dtype:
        path = self._where[key]
        if path in self._safetensors:
            name = self._safetensors[path].get_slice(key).get_dtype()
            return _SAFETENSORS_DTYPES.get(name) or getattr(torch, name.lower())
        return self._pickled[path][key].dtype

    def get(self, key: str) -> torch.Tensor:
        """The tensor, read now (safetensors) or paged in from the mapped file (pickles)."""
        path = self._where[key]
        if path in self._safetensors:
            try:
                return self._safetensors[path].get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise ConversionError(f"{path}: cannot read {key!r} ({err}); the file is damaged.") from err
        return self._pickled[path][key]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ConversionError(
            f"{path} cannot be read as safetensors ({err}); the file is truncated or damaged "
            "(copy it again, or use the previous checkpoint)."
        ) from err


def _load_pickled_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """``torch.load`` with ``mmap=True`` (tensors stay in the file until used) and
    ``weights_only=True`` (no code in the pickle runs); old non-zip pickles cannot be mapped
    and are read whole."""
    _refuse_deepspeed_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap can only be used" not in str(err):
            raise _unreadable(path, err) from err
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err2:  # noqa: BLE001 - re-raised with the file named
            raise _unreadable(path, err2) from err2
    except Exception as err:  # noqa: BLE001 - torch raises OSError/EOFError/UnpicklingError...
        raise _unreadable(path, err) from err
    return _as_flat_state_dict(loaded, path)


def _unreadable(path: Path, err: BaseException) -> ConversionError:
    return ConversionError(
        f"{path} cannot be loaded as a state dict ({type(err).__name__}: {err}); the file is "
        "truncated or damaged, or not a torch.save'd dict of tensors."
    )


def _as_flat_state_dict(loaded: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """Accept a flat ``{name: tensor}`` dict, or one nested under ``state_dict``/``model``/
    ``module`` (how some trainers save); anything else is named and refused."""
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict.")
    if not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        for wrapper in ("state_dict", "model", "module"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                return inner
        bad = next(k for k, v in loaded.items() if not isinstance(v, torch.Tensor))
        raise ConversionError(
            f"{path}: {bad!r} is a {type(loaded[bad]).__name__}, not a tensor; expected a flat "
            "state dict (torch.save(model.state_dict()))."
        )
    return loaded


_DEEPSPEED_FILE = re.compile(r"(^|_)(model|optim)_states\.pt$")


def _refuse_deepspeed_file(path: Path) -> None:
    if _DEEPSPEED_FILE.search(path.name):
        raise ConversionError(
            f"{path} is a DeepSpeed ZeRO shard, not a consolidated state dict. Consolidate the "
            f"checkpoint first: `python {path.parent.parent / 'zero_to_fp32.py'} "
            f"{path.parent.parent} consolidated.bin` (zero_to_fp32.py is written beside every "
            "DeepSpeed checkpoint), then convert consolidated.bin."
        )


def _refuse_deepspeed_dir(directory: Path) -> None:
    """A DeepSpeed checkpoint directory (``latest``, ``global_step*/``, ``*_model_states.pt``)
    holds partitioned optimizer state, not a state dict."""
    marks = [directory / "latest", directory / "zero_to_fp32.py"]
    states = list(directory.glob("*model_states.pt")) + list(directory.glob("global_step*/*model_states.pt"))
    if states or any(m.exists() for m in marks):
        raise ConversionError(
            f"{directory} is a DeepSpeed checkpoint directory, not a consolidated state dict. "
            f"Run `python {directory / 'zero_to_fp32.py'} {directory} consolidated.bin` "
            "(or deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint and "
            "torch.save) and convert consolidated.bin."
        )


def weight_files(directory: Path) -> List[Path]:
    """The backbone weight files of a checkpoint directory: those its index json names, else
    every ``.safetensors``/``.bin``/``.pt``/``.pth`` file that is not an HMT, adapter or
    extras file."""
    indexes = sorted(directory.glob("*.index.json"))
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.name not in NOT_BACKBONE
    )
    safetensors_files = [p for p in files if p.suffix == ".safetensors"]
    # HF repos often carry both formats of the same weights: prefer safetensors.
    files = safetensors_files or files
    if not files:
        raise ConversionError(f"{directory} holds no weight files (.safetensors, .bin, .pt, .pth).")
    return files


def _files_from_index(index: Path) -> List[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{index} is not a valid index file ({err}).") from err
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            key = next(k for k, v in weight_map.items() if index.parent / v == path)
            raise ConversionError(f"{path} is missing: {index.name} puts {key!r} (and others) in it.")
    return files


def open_state_dict(source: PathLike) -> TensorSource:
    """Open a state dict lazily: one file, or a directory of shards (with or without an index).

    Raises:
        ConversionError: missing/damaged file (named), a DeepSpeed directory that was not
            consolidated, a file that does not hold a flat dict of tensors.
    """
    path = Path(source)
    if not path.exists():
        raise ConversionError(f"{path} does not exist.")
    if path.is_dir():
        _refuse_deepspeed_dir(path)
        files = weight_files(path)
    else:
        files = [path]
    reader = TensorSource()
    for file in files:
        reader.add_file(file)
    return reader


# ----------------------------------------------------------------------------- writing
def parse_size(size: Union[int, str]) -> int:
    """``5GB``/``500MB``/``1GiB``/bytes -> bytes (decimal units, as HF's ``max_shard_size``)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; write e.g. 5GB, 500MB or 1000000.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * factors[unit])


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Write tensors into HF-style safetensors shards (``model-00001-of-0000N.safetensors``,
    torchtune's names) plus ``model.safetensors.index.json``, a shard at a time.

    A shard is written as soon as the next tensor would push it over ``max_shard_size``, so
    at most one shard is held in memory. Shards get their final ``-of-N`` names in
    :meth:`close`, once N is known.
    """

    def __init__(self, directory: Path, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._parts: List[Tuple[Path, List[str]]] = []
        self.total_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = nbytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self._flush()
        # safetensors refuses tensors that share memory (tied embeddings) or are views.
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if ptr is not None and any(
            t.numel() and t.untyped_storage().data_ptr() == ptr for t in self._buffer.values()
        ):
            tensor = tensor.clone()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        part = self.directory / f".part-{len(self._parts) + 1:05d}.safetensors.tmp"
        save_file(self._buffer, str(part), metadata={"format": "pt"})
        self._parts.append((part, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> Dict[str, str]:
        """Write the last shard, name the shards, write the index; returns key -> file."""
        if self._buffer or not self._parts:
            self._flush()
        count = len(self._parts)
        weight_map: Dict[str, str] = {}
        for idx, (part, keys) in enumerate(self._parts, start=1):
            name = SHARD_FNAME.format(cpt_idx=f"{idx}".zfill(5), num_shards=f"{count}".zfill(5))
            name += ".safetensors"
            os.replace(part, self.directory / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.directory / SAFETENSOR_INDEX_FNAME).write_text(json.dumps(index, indent=2))
        return weight_map


def progress(items: Iterable, *, desc: str, total: Optional[int] = None, enabled: bool = True) -> Iterable:
    """tqdm over ``items`` on stderr (silent when ``enabled`` is False)."""
    return tqdm(items, desc=desc, total=total, unit="tensor", disable=not enabled, leave=False)


def copy_side_files(source: Path, target: Path, *, skip: Iterable[str] = ()) -> List[str]:
    """Copy the small files that travel with a checkpoint (tokenizer, generation config,
    README, ...): every regular file that is not a weight file or index, nor in ``skip``."""
    skip = set(skip)
    copied = []
    for item in sorted(source.iterdir()):
        if not item.is_file() or item.name in skip or item.name.startswith("."):
            continue
        if item.suffix in WEIGHT_SUFFIXES or item.name.endswith(".index.json"):
            continue
        shutil.copy2(item, target / item.name)
        copied.append(item.name)
    return copied


__all__ = [
    "ADAPTER_FILES",
    "ConversionError",
    "ConversionResult",
    "DEFAULT_MAX_SHARD_SIZE",
    "HMTCheckpointError",
    "PUBLISHED_EXTRAS",
    "ShardWriter",
    "TensorSource",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "copy_side_files",
    "move_into_place",
    "open_state_dict",
    "parse_size",
    "progress",
    "staged",
    "staged_directory",
    "weight_files",
]
