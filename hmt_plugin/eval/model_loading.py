"""Build an HMT model for evaluation or generation from a config node: the backbone through
torchtune's checkpointer, the HMT parameters from our checkpoint files (or fresh)."""

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from hmt_plugin.checkpointing.hmt_files import HMT_CONFIG, load_hmt_checkpoint
from hmt_plugin.checkpointing.io import ADAPTER_PT
from hmt_plugin.modules.hmt import HMT
from hmt_plugin.training.model_setup import (
    initial_state_dict,
    load_adapter_state,
    load_initial_state,
    lora_settings,
)
from hmt_plugin.training.run_config import ConfigError

log = utils.get_logger("INFO")

# Top-level config keys of every recipe that reads a trained model (hmt_eval, hmt_generate):
# what load_hmt_model and the tokenizer need, and the free variables the shipped configs
# interpolate.
MODEL_READING_KEYS = frozenset({
    "output_dir", "seed", "device", "dtype", "model", "checkpointer", "hmt_checkpoint",
    "tokenizer", "run_dir", "backbone_dir", "model_dir",
})

# Settings that change what a checkpoint's weights mean: a model read with other values
# computes something the checkpoint was not trained for.
_MUST_MATCH = (
    "segment_length",
    "num_memory_tokens",
    "num_sensory",
    "sum_fraction",
    "recall_hidden_dim",
    "score_scale",
    "memory_scale",
    "memory_sink",
)


def load_hmt_model(
    model_cfg: DictConfig,
    checkpointer_cfg: DictConfig,
    hmt_checkpoint: Optional[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    where: str = "",
) -> HMT:
    """Instantiate ``model_cfg``, load the backbone with ``checkpointer_cfg`` and the HMT
    parameters from ``hmt_checkpoint`` (None: freshly drawn, as at the start of training).
    Returns the model in eval mode.

    Raises:
        ConfigError: a missing checkpoint directory, or HMT settings that differ from the
            ones the checkpoint was trained with (naming the setting and the fix).
    """
    if model_cfg is None or checkpointer_cfg is None:
        raise ConfigError(f"{where}`model` and `checkpointer` are required to build the model.")
    checkpointer = _instantiate_checkpointer(checkpointer_cfg, where)
    if hmt_checkpoint is not None and not Path(hmt_checkpoint).is_dir():
        raise ConfigError(
            f"{where}hmt_checkpoint={str(hmt_checkpoint)!r} does not exist. Point it at a training "
            "run's `final` (or `step_*`) directory, or set it to null to read with freshly "
            "initialised HMT parameters."
        )
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(model_cfg)
    if not isinstance(model, HMT):
        raise ConfigError(
            f"{where}model must build an HMT model (hmt_plugin.models.*); "
            f"got {type(model).__name__}."
        )
    if hmt_checkpoint is not None:
        _check_settings(model, Path(hmt_checkpoint), where)
    base = checkpointer.load_checkpoint()[training.MODEL_KEY]
    lora = lora_settings(model)
    adapter = None
    if lora is not None and hmt_checkpoint is not None and (Path(hmt_checkpoint) / ADAPTER_PT).is_file():
        # A LoRA model reads the adapter kept beside the HMT files; without one it starts fresh.
        adapter = load_adapter_state(hmt_checkpoint)
    full = initial_state_dict(
        model, base, lora=lora, seed=seed, adapter_state=adapter, hmt_checkpoint=hmt_checkpoint
    )
    load_initial_state(model, full, lora)
    if hmt_checkpoint is None and model.config.uses_memory:
        log.warning(
            f"{where}hmt_checkpoint is null: the HMT parameters are freshly initialised, so the "
            "memory modes read with untrained memory."
        )
    return model.eval()


def _instantiate_checkpointer(checkpointer_cfg: DictConfig, where: str) -> Any:
    """The backbone's checkpointer. A ``checkpoint_dir`` that does not exist is named with the
    fix when the checkpointer cannot read it; one that writes its checkpoint when it is
    missing (the demo's random tiny Llama) goes ahead."""
    try:
        return config.instantiate(checkpointer_cfg)
    except (FileNotFoundError, ValueError) as err:
        directory = checkpointer_cfg.get("checkpoint_dir")
        if directory is None or Path(directory).is_dir():
            raise
        raise ConfigError(
            f"{where}checkpointer.checkpoint_dir={directory!r} does not exist. Point it at the "
            "backbone's checkpoint directory (a downloaded model, or a training run's "
            "`final` / `step_*` directory)."
        ) from err


def _check_settings(model: HMT, directory: Path, where: str) -> None:
    if not (directory / HMT_CONFIG).is_file():
        return  # load_hmt_checkpoint names the missing file
    _, saved, _ = load_hmt_checkpoint(directory)
    ours = model.config
    for name in _MUST_MATCH:
        mine, theirs = getattr(ours, name), getattr(saved, name)
        if name == "recall_hidden_dim":
            dim = model.backbone.tok_embeddings.embedding_dim
            mine, theirs = mine or dim, theirs or dim
        if mine != theirs:
            raise ConfigError(
                f"{where}model.{name}={mine!r} but the checkpoint {directory} was trained with "
                f"{name}={theirs!r}; set model.{name}: {theirs!r} (the weights only make sense "
                "with the settings they were trained with)."
            )
    for field in dataclasses.fields(ours):
        if field.name not in _MUST_MATCH + ("mode",) and getattr(ours, field.name) != getattr(
            saved, field.name
        ):
            log.info(
                f"{where}model.{field.name}={getattr(ours, field.name)!r} (trained with "
                f"{getattr(saved, field.name)!r})."
            )


def describe(model: HMT, mode: Optional[str] = None, *, keep_tokens_per_segment: bool = True) -> str:
    """One line about the model (read in ``mode``, by default at the model's new tokens per
    segment), for logs."""
    cfg = model.config.with_mode(mode, keep_tokens_per_segment=keep_tokens_per_segment) if mode else model.config
    n = sum(p.numel() for p in model.parameters())
    return (
        f"HMT ({cfg.mode}): {n:,} parameters, segment_length {cfg.segment_length}, "
        f"{cfg.tokens_per_segment} new tokens per segment, {cfg.sensory_tokens_used} sensory, "
        f"memory cache {cfg.cache_size}"
    )
