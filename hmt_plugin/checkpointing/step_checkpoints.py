"""Step checkpoints of an HMT run: written whole or not at all, found again on resume.

Layout under the run's ``output_dir``::

    step_0000100/          an intermediate checkpoint
        adapter_model.pt, adapter_model.safetensors, adapter_config.json   (LoRA)
        model-0000k-of-0000N.safetensors, model.safetensors.index.json     (full fine-tune)
        config.json, ...                 (copied by torchtune's checkpointer)
        hmt_model.safetensors, hmt_config.json
        recipe_state.pt                  (optimizer, LR schedule, data position, RNG)
        CHECKPOINT_COMPLETE
    final/                 the end of training: merged HF-format backbone + HMT files

The backbone goes through the torchtune checkpointer of the config (HF, Meta or torchtune
format, key conversion included). Everything is written into ``.<name>.partial/`` first and
renamed into place last (:mod:`hmt_plugin.checkpointing.io`), so a kill or a full disk mid-save leaves the previous checkpoint
as it was, and ``latest_checkpoint`` only ever returns complete ones.
"""

import errno
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune import training

from hmt_plugin.checkpointing.hmt_files import save_hmt_checkpoint
from hmt_plugin.checkpointing.io import atomic_torch_save, atomic_write_bytes, move_into_place, staged
from hmt_plugin.modules.hmt_config import HMTConfig

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
RECIPE_STATE = "recipe_state.pt"
FINAL = "final"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(output_dir: os.PathLike) -> List[Path]:
    """Complete step checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: os.PathLike) -> Optional[Path]:
    """The newest complete step checkpoint, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def resume_point(output_dir: os.PathLike, resume: bool) -> Optional[Path]:
    """The checkpoint to resume from: None without ``resume_from_checkpoint``, else the newest
    complete one (an error when there is none)."""
    if not resume:
        return None
    found = latest_checkpoint(output_dir)
    if found is None:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {output_dir} holds no complete step checkpoint; "
            "run without it to start fresh."
        )
    return found


def check_finite_loss(loss: float, next_step: int, output_dir: os.PathLike) -> None:
    """Stop before an optimizer step that would write NaN/inf into the weights, naming the
    step and the last good checkpoint."""
    if math.isfinite(loss):
        return
    latest = latest_checkpoint(output_dir)
    raise FloatingPointError(
        f"the loss is {loss} at step {next_step}; stopping before the optimizer step. The last "
        f"good checkpoint is {latest or 'none yet'}. Lower the learning rate, enable "
        "clip_grad_norm, or use dtype=fp32."
    )


def load_recipe_state(checkpoint: os.PathLike) -> Dict[str, Any]:
    path = Path(checkpoint) / RECIPE_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {checkpoint} is not a resumable checkpoint (final checkpoints "
            "hold no training state)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged pickle raises many different types
        # Resume always takes the newest complete checkpoint, so the way back to an older one
        # is to take this one out of the running.
        raise RuntimeError(
            f"{path} cannot be read ({err}): the checkpoint is damaged. Delete {checkpoint} (or "
            f"its {COMPLETE_MARKER} file) and resume again to continue from the checkpoint "
            "before it."
        ) from err


# Settings that decide which batch comes next and what a step is: a resumed run that changes
# them does not continue the interrupted run, it silently trains on a different schedule.
RESUME_SETTINGS = ("batch_size", "gradient_accumulation_steps", "max_steps_per_epoch", "shuffle",
                   "windows")


def resume_settings(cfg: Any, hmt_config: HMTConfig, world_size: int) -> Dict[str, Any]:
    """What :func:`check_resume` compares, recorded in every step checkpoint's recipe state."""
    from omegaconf import OmegaConf

    out = {}
    for key in RESUME_SETTINGS:
        value = cfg.get(key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = value
    out["hmt"] = hmt_config.to_dict()
    out["world_size"] = world_size
    return out


def check_resume(state: Dict[str, Any], current: Dict[str, Any], checkpoint: os.PathLike) -> None:
    """Refuse to resume ``checkpoint`` with settings that would not continue its run.

    Raises:
        ValueError: naming the setting, its value in the checkpoint and the fix.
    """
    saved = dict(state.get("settings") or {})
    # Checkpoints of the distributed recipe record their world size; older ones, and those of
    # the single-device recipe, hold one data-loader state per rank or a single one.
    saved.setdefault("world_size", state.get("world_size", 1))
    if saved["world_size"] != current["world_size"]:
        n = saved["world_size"]
        how = (
            "hmt_finetune_single_device" if n == 1
            else f"`hmt-tune run --nproc_per_node {n} hmt_finetune_distributed`"
        )
        raise ValueError(
            f"{checkpoint} was written by a run on {n} process(es) and this run has "
            f"{current['world_size']}: the data position and RNG state are per rank. Resume it "
            f"with {how}, or start a new run in another output_dir."
        )
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(
                f"resume_from_checkpoint: {key}={value!r} but {checkpoint} was trained with "
                f"{key}={saved[key]!r}. Restore {key} to resume that run, or start a new run "
                "in another output_dir."
            )


def _first_non_finite(parts: Dict[str, Optional[Dict[str, torch.Tensor]]]) -> Optional[str]:
    for part, tensors in parts.items():
        for key, value in (tensors or {}).items():
            if not (torch.is_tensor(value) and value.is_floating_point()):
                continue
            if not torch.isfinite(value).all():
                return f"{part}[{key!r}]"
    return None


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class CheckpointWriter:
    """Writes checkpoint directories through a torchtune checkpointer.

    torchtune 0.6.1 checkpointers write into ``<their output_dir>/epoch_<n>/``. The writer points
    that output_dir at a staging directory for the duration of one save (the one seam into
    the checkpointer), then adds the HMT files, the recipe state and the completion marker,
    and renames the directory into place.

    Args:
        checkpointer: a torchtune checkpointer that has loaded the base model (it needs the
            weight map from ``load_checkpoint`` to shard the output like the input).
        output_dir: the run's output directory.
        keep_last_n (Optional[int]): delete older step checkpoints beyond this many.
    """

    def __init__(self, checkpointer: Any, output_dir: os.PathLike, keep_last_n: Optional[int] = None):
        self._checkpointer = checkpointer
        self._root = Path(output_dir)
        self._keep_last_n = keep_last_n

    def save(
        self,
        name: str,
        *,
        hmt_state: Dict[str, torch.Tensor],
        hmt_config: HMTConfig,
        model_state: Optional[Dict[str, torch.Tensor]] = None,
        adapter_state: Optional[Dict[str, torch.Tensor]] = None,
        adapter_config: Optional[Dict[str, Any]] = None,
        recipe_state: Optional[Dict[str, Any]] = None,
        meta: Optional[Dict[str, Any]] = None,
    ) -> Path:
        """Write checkpoint ``name`` (e.g. ``step_dir_name(step)`` or ``FINAL``).

        Args:
            hmt_state: HMT parameters (full tensors).
            hmt_config: the model's settings.
            model_state: backbone weights in torchtune keys (full fine-tune, or merged LoRA).
            adapter_state / adapter_config: LoRA adapters (torchtune keys) and their config.
            recipe_state: what resuming needs; None for a final checkpoint.
            meta: facts recorded in ``hmt_config.json`` and the marker (step, epoch, ...).
        """
        self._root.mkdir(parents=True, exist_ok=True)
        # A step checkpoint with NaN/inf weights would become "the last good checkpoint" that
        # every resume starts from; refuse it (the loss check catches most divergences a step
        # earlier, this catches an update that overflowed the weights themselves).
        bad = _first_non_finite(
            {"hmt_state": hmt_state, "model_state": model_state, "adapter_state": adapter_state}
        )
        if bad is not None:
            raise FloatingPointError(
                f"not writing checkpoint {name!r}: {bad} holds NaN or inf (training diverged at "
                f"step {(meta or {}).get('step', '?')}). The last good checkpoint is "
                f"{latest_checkpoint(self._root) or 'none yet'}. Lower the learning rate, enable "
                "clip_grad_norm, or use dtype=fp32."
            )
        try:
            with staged(self._root / name) as staging:
                target = self._write(name, staging, hmt_state, hmt_config, model_state,
                                     adapter_state, adapter_config, recipe_state, meta)
        except OSError as err:
            # The staging directory is gone by now: a kill leaves it, and the next save of the
            # same name replaces it.
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(
                    err.errno,
                    f"no space left for checkpoint {name!r} in {self._root} ({err}). The "
                    f"partial write was removed and the previous checkpoint "
                    f"({latest_checkpoint(self._root) or 'none yet'}) is intact. Free space, "
                    "lower keep_last_n_checkpoints, or move output_dir to a larger disk, then "
                    "rerun with resume_from_checkpoint=True.",
                ) from err
            raise
        self._prune()
        return target

    def _write(self, name, staging, hmt_state, hmt_config, model_state, adapter_state,
               adapter_config, recipe_state, meta) -> Path:
        ckpt: Dict[str, Any] = {}
        if model_state is not None:
            ckpt[training.MODEL_KEY] = model_state
        if adapter_state is not None:
            ckpt[training.ADAPTER_KEY] = adapter_state
            ckpt[training.ADAPTER_CONFIG] = adapter_config
        if not ckpt:
            raise ValueError("a checkpoint needs backbone weights or adapters to save.")
        original = self._checkpointer._output_dir
        self._checkpointer._output_dir = staging
        try:
            self._checkpointer.save_checkpoint(
                ckpt, epoch=0, intermediate_checkpoint=False, adapter_only=model_state is None
            )
        finally:
            self._checkpointer._output_dir = original
        written = staging / "epoch_0"
        save_hmt_checkpoint(written, hmt_state, hmt_config, extra=meta)
        if recipe_state is not None:
            atomic_torch_save(recipe_state, written / RECIPE_STATE)
        record = {"name": name, "time": time.time(), **(meta or {})}
        atomic_write_bytes(written / COMPLETE_MARKER, json.dumps(record, indent=2).encode())
        target = self._root / name
        move_into_place(written, target, merge=False)
        return target

    def _prune(self) -> None:
        if not self._keep_last_n:
            return
        for path in complete_checkpoints(self._root)[: -self._keep_last_n]:
            shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "COMPLETE_MARKER",
    "FINAL",
    "RECIPE_STATE",
    "RESUME_SETTINGS",
    "CheckpointError",
    "CheckpointWriter",
    "check_finite_loss",
    "check_resume",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_recipe_state",
    "resume_point",
    "resume_settings",
    "step_dir_name",
]
