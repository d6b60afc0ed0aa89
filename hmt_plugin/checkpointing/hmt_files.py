"""Our checkpoint format: the HMT parameters' own files, written beside torchtune's checkpoint
of the backbone.

A checkpoint directory of ours is whatever torchtune's checkpointer writes for the backbone
(HF-format shards, ``config.json``, adapters) plus:

* ``hmt_model.safetensors``: the HMT parameters under their names in :class:`HMT`
  (``initial_memory``, ``summary_token``, ``recall.q_proj.weight``, ``recall.k_proj.weight``);
* ``hmt_config.json``: ``{"format": ..., "hmt": <HMTConfig>, ...}``.

Both are written atomically (:mod:`hmt_plugin.checkpointing.io`), so a run killed while
saving never leaves a half-written file under the real name. The converters read such a
directory through :func:`open_our_checkpoint`.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.hf_config import GIVE_THE_BACKBONE_CONFIG, read_hf_config_file
from hmt_plugin.checkpointing.io import (
    HMT_WEIGHTS,
    PUBLISHED_EXTRAS,
    ConversionError,
    HMTCheckpointError,
    PathLike,
    TensorSource,
    atomic_save_safetensors,
    atomic_write_bytes,
    open_state_dict,
)
from hmt_plugin.checkpointing.peft_keys import TuneAdapter, load_adapter
from hmt_plugin.modules.hmt_config import HMTConfig

HMT_CONFIG = "hmt_config.json"
FORMAT = "hmt-torchtune/1"
RECALL_PARAMS = ("summary_token", "recall.q_proj.weight", "recall.k_proj.weight")


def save_hmt_checkpoint(
    directory: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: HMTConfig,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the HMT parameters and settings into ``directory`` (created if needed).

    Args:
        directory: the checkpoint directory (the one torchtune's checkpointer writes to).
        state_dict: HMT parameters only (``HMT.hmt_state_dict()``), full tensors.
        config: the model's :class:`HMTConfig`.
        extra: more JSON-able facts to record (backbone type, training step, ...).

    Returns:
        Path: the weights file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in tensors):
        raise HMTCheckpointError(
            "save_hmt_checkpoint got backbone keys; pass HMT.hmt_state_dict() (the backbone is "
            "saved by torchtune's checkpointer)."
        )
    atomic_save_safetensors(tensors, directory / HMT_WEIGHTS, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "hmt": config.to_dict(), **(extra or {})}
    atomic_write_bytes(directory / HMT_CONFIG, json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory / HMT_WEIGHTS


def load_hmt_checkpoint(
    directory: PathLike,
) -> Tuple[Dict[str, torch.Tensor], HMTConfig, Dict[str, Any]]:
    """Read ``hmt_model.safetensors`` and ``hmt_config.json`` from ``directory``.

    Returns:
        (state dict, HMTConfig, the whole JSON record)

    Raises:
        HMTCheckpointError: missing or damaged files, naming the file.
    """
    directory = Path(directory)
    weights, cfg_path = directory / HMT_WEIGHTS, directory / HMT_CONFIG
    for path in (weights, cfg_path):
        if not path.is_file():
            raise HMTCheckpointError(
                f"{path} does not exist: {directory} is not an HMT checkpoint directory (it needs "
                f"{HMT_WEIGHTS} and {HMT_CONFIG}; a stage-1 run writes them at every save)."
            )
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HMTCheckpointError(f"{cfg_path} is not valid JSON ({err}); the file is damaged.") from err
    if meta.get("format") != FORMAT or "hmt" not in meta:
        raise HMTCheckpointError(f"{cfg_path} is not an {FORMAT} settings file.")
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise HMTCheckpointError(
            f"{weights} cannot be read ({err}); the file is truncated or damaged. Use the "
            "previous checkpoint."
        ) from err
    return state_dict, HMTConfig.from_dict(meta["hmt"]), meta


def load_hmt_into(model: torch.nn.Module, directory: PathLike) -> Dict[str, Any]:
    """Load an HMT checkpoint's parameters into ``model`` (an :class:`HMT`).

    A stage-1 checkpoint (no recall parameters) loads into an ``hmt`` model: the recall
    parameters keep their initialisation, as in the paper's stage 2. Anything else that does
    not fit (another backbone size, another ``recall_hidden_dim``) is refused.

    Returns:
        Dict[str, Any]: the checkpoint's JSON record.
    """
    state_dict, saved, meta = load_hmt_checkpoint(directory)
    check_hmt_state_dict(model, state_dict, source=str(Path(directory) / HMT_WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state_dict.items():
            params[name].copy_(value.to(params[name].dtype))
    return meta


def check_hmt_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise :class:`HMTCheckpointError` naming the key unless ``state_dict`` fits ``model``'s
    HMT parameters (recall parameters may be missing: stage 1 -> stage 2)."""
    ours = {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}
    # Parameters that exist only under an option (and then in every memory mode).
    for name, setting, values in (("memory_norm", "memory_scale", ("'published'", "'embedding'")),
                                  ("sink", "memory_sink", ("False", "True"))):
        saved, built = name in state_dict, name in ours
        if saved != built and "initial_memory" in state_dict and "initial_memory" in ours:
            raise HMTCheckpointError(
                f"{source} was trained with {setting}={values[saved]} and this model is built with "
                f"{setting}={values[built]}; set the model's {setting} to match."
            )
    for name, value in state_dict.items():
        if name not in ours:
            raise HMTCheckpointError(
                f"{source} has {name!r}, which this {model.config.mode!r} model does not have; "
                "build the model in the mode the checkpoint was trained in (or 'hmt')."
            )
        if tuple(value.shape) != tuple(ours[name].shape):
            raise HMTCheckpointError(
                f"{source}: {name!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(ours[name].shape)}; the checkpoint is for another backbone size or "
                "recall_hidden_dim."
            )
    missing = [n for n in ours if n not in state_dict and n not in RECALL_PARAMS]
    if missing:
        raise HMTCheckpointError(f"{source} lacks {missing}; it is not a checkpoint of this model.")


@dataclass
class OurCheckpoint:
    """One of our checkpoint directories, opened lazily."""

    directory: Path
    config: Dict[str, Any]
    config_bytes: bytes
    layout: BackboneLayout
    backbone: TensorSource
    adapter: Optional[TuneAdapter]


def open_our_checkpoint(directory: PathLike) -> OurCheckpoint:
    """Open one of our checkpoint directories for a converter: ``config.json`` (its exact
    bytes too), the backbone's tensors (lazily, checked against the config) and the adapter.

    Raises:
        ConversionError: not a directory, or a backbone that does not fit its config.json.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory} is not a checkpoint directory.")
    hf = read_hf_config_file(directory, hint=GIVE_THE_BACKBONE_CONFIG)
    layout = BackboneLayout.from_hf_config(hf.values, source=hf.name)
    backbone = open_state_dict(directory)
    layout.check(backbone.shapes(), str(directory))
    return OurCheckpoint(directory, hf.values, hf.raw, layout, backbone, load_adapter(directory, layout))


def copy_hmt_files(source: Path, target: Path) -> List[str]:
    """Copy the HMT files (and the published extras) a converter carries along; returns the
    names copied."""
    copied = []
    for name in (HMT_WEIGHTS, HMT_CONFIG, PUBLISHED_EXTRAS):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
