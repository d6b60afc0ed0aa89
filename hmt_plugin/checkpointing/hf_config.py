"""A Hugging Face ``config.json``, read in one place: by the decoder builder, the checkpointer,
the backbone layout and the converters."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from hmt_plugin.checkpointing.io import ConversionError

HF_CONFIG = "config.json"
HFConfigSource = Union[str, Path, Mapping[str, Any]]

# What a missing config.json asks for: a downloaded checkpoint's, or (converters) the
# backbone's, which the published checkpoints do not carry.
POINT_AT_A_CHECKPOINT = "point at a Hugging Face checkpoint directory."
GIVE_THE_BACKBONE_CONFIG = (
    "give the HF config.json of the backbone (the published checkpoints do not carry it; it is "
    "the one of --model_name)."
)


class MissingHFConfig(ConversionError, FileNotFoundError):
    """No ``config.json`` where one was looked for (a missing file and a failed conversion)."""


@dataclass(frozen=True)
class HFConfigFile:
    """A ``config.json`` as read.

    Attributes:
        values (Dict[str, Any]): the parsed settings.
        raw (bytes): the file's exact bytes (a dict given in its place: its JSON), so a
            converter copies it unchanged and round trips leave it byte for byte the same.
        name (str): where it came from, for messages.
    """

    values: Dict[str, Any]
    raw: bytes
    name: str


def read_hf_config_file(source: HFConfigSource, *, hint: str = POINT_AT_A_CHECKPOINT) -> HFConfigFile:
    """Read ``config.json`` from a dict, the file, or the checkpoint directory.

    Args:
        source: the settings themselves, ``config.json``, or the directory that holds it.
        hint: what the error for a missing file tells the user to do.

    Raises:
        MissingHFConfig: no such file (a ``FileNotFoundError`` and a ``ConversionError``).
        ConversionError: the file is not valid JSON.
    """
    if isinstance(source, Mapping):
        return HFConfigFile(dict(source), json.dumps(dict(source), indent=2).encode(), "the given HF config")
    path = Path(source)
    if path.is_dir():
        path = path / HF_CONFIG
    if not path.is_file():
        raise MissingHFConfig(f"no config.json at {path}: {hint}")
    raw = path.read_bytes()
    try:
        return HFConfigFile(json.loads(raw), raw, str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err}); the file is damaged.") from err


def read_hf_config(source: HFConfigSource) -> Dict[str, Any]:
    """``config.json``'s settings (:func:`read_hf_config_file`)."""
    return read_hf_config_file(source).values


def rope_theta_of(config: Mapping[str, Any], default: float = 10_000.0) -> float:
    """RoPE base: transformers 4 writes ``rope_theta``, transformers 5 ``rope_parameters``."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", default))


def rope_scaling_of(config: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The RoPE scaling of a config with its type under ``rope_type``, or None for plain RoPE
    (transformers 4: ``rope_scaling`` with ``rope_type`` or ``type``; 5: ``rope_parameters``)."""
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    scaling["rope_type"] = kind
    return scaling
