"""Loading weights into an HMT model in a recipe: the backbone through torchtune, the HMT
parameters from our files (or freshly drawn), LoRA bookkeeping. Shared by the single-device,
distributed, eval and generation recipes."""

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune.modules.peft import (
    DoRALinear,
    LoRALinear,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)

from hmt_plugin.checkpointing.hmt_files import HMT_WEIGHTS, load_hmt_into
from hmt_plugin.modules.hmt import HMT


def lora_settings(model: HMT) -> Optional[Dict[str, Any]]:
    """Rank, alpha and targets of the LoRA adapters in ``model``'s backbone, read from the
    modules themselves (the config may nest them under ``backbone``), or None without LoRA."""
    adapters = {
        name: m for name, m in model.backbone.named_modules() if isinstance(m, (LoRALinear, DoRALinear))
    }
    if not adapters:
        return None
    ranks = {m.rank for m in adapters.values()}
    alphas = {m.alpha for m in adapters.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"LoRA adapters with mixed ranks {ranks} / alphas {alphas} are not supported.")
    leaves = {name.rsplit(".", 1)[-1] for name in adapters}
    attn = sorted(leaves & {"q_proj", "k_proj", "v_proj", "output_proj"})
    mlp = bool(leaves & {"w1", "w2", "w3"})
    output = "output" in adapters
    return {
        "rank": ranks.pop(),
        "alpha": alphas.pop(),
        "lora_attn_modules": attn,
        "apply_lora_to_mlp": mlp,
        "apply_lora_to_output": output,
        "is_dora": any(isinstance(m, DoRALinear) for m in adapters.values()),
    }


def adapter_config(lora: Dict[str, Any]) -> Dict[str, Any]:
    """The adapter config torchtune's checkpointer converts to PEFT's ``adapter_config.json``."""
    return {
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "target_modules": get_lora_module_names(
            lora["lora_attn_modules"], lora["apply_lora_to_mlp"], lora["apply_lora_to_output"]
        ),
        "peft_type": "LORA",
    }


def set_trainable(model: HMT, lora: Optional[Dict[str, Any]]) -> List[str]:
    """LoRA: adapters and HMT parameters train, the base weights are frozen. Full fine-tune:
    everything trains. Returns the trainable parameter names."""
    if lora is not None:
        set_trainable_params(model, get_adapter_params(model))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_backbone(
    model: HMT,
    base_state: Dict[str, torch.Tensor],
    lora: Optional[Dict[str, Any]],
    adapter_state: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """Base weights (torchtune keys) and optional LoRA adapters into ``model.backbone``, with
    torchtune's own validation of what is missing or unexpected."""
    if lora is None:
        missing, unexpected = model.backbone.load_state_dict(base_state, strict=False)
        if missing or unexpected:
            raise KeyError(
                "the checkpoint does not fit the configured backbone: "
                f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}. Check that "
                "`model` and `checkpointer` describe the same architecture and size."
            )
        return
    base_missing, base_unexpected = model.backbone.load_state_dict(base_state, strict=False)
    if lora["is_dora"]:
        for m in model.backbone.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    lora_missing = lora_unexpected = None
    if adapter_state:
        lora_missing, lora_unexpected = model.backbone.load_state_dict(adapter_state, strict=False)
    try:
        validate_missing_and_unexpected_for_lora(
            lora_attn_modules=lora["lora_attn_modules"],
            apply_lora_to_mlp=lora["apply_lora_to_mlp"],
            apply_lora_to_output=lora["apply_lora_to_output"],
            base_missing=base_missing,
            base_unexpected=base_unexpected,
            lora_missing=lora_missing,
            lora_unexpected=lora_unexpected,
        )
    except AssertionError as err:
        raise KeyError(
            f"the checkpoint does not fit the configured LoRA backbone ({err}). Check that `model` "
            "and `checkpointer` describe the same architecture and size."
        ) from err


def init_hmt_parameters(
    model: HMT, hmt_checkpoint: Optional[os.PathLike], seed: int
) -> Optional[Dict[str, Any]]:
    """Draw the HMT parameters from the loaded token embeddings (seeded), then load an HMT
    checkpoint over them if one is given (a stage-1 checkpoint leaves the recall parameters
    freshly drawn, as the paper's stage 2 starts). Returns the checkpoint's JSON record."""
    model.reset_hmt_parameters(generator=torch.Generator().manual_seed(seed))
    if hmt_checkpoint is None:
        return None
    path = Path(hmt_checkpoint)
    if not (path / HMT_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"hmt_checkpoint={str(path)!r} holds no {HMT_WEIGHTS}. Point it at a checkpoint "
            "directory of an earlier run (e.g. the stage-1 run's `final` directory), or set "
            "hmt_checkpoint=null to start the HMT parameters fresh."
        )
    return load_hmt_into(model, path)


def cpu_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU *copy* of ``model.state_dict()`` (on CPU, ``.cpu()`` alone would alias the
    live weights; torchtune 0.6.1's LoRA recipe merges adapters into such aliases)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def checkpoint_parts(
    full_state: Dict[str, torch.Tensor], lora: Optional[Dict[str, Any]], final: bool
) -> Dict[str, Any]:
    """Split a full CPU state dict of an :class:`HMT` (its own copy: merging works in place)
    into what a checkpoint holds: ``hmt_state``; ``model_state`` (torchtune keys; LoRA merged
    in, only at the end of a LoRA run); ``adapter_state``/``adapter_config`` (LoRA)."""
    prefix = "backbone."
    backbone = {k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)}
    parts: Dict[str, Any] = {
        "hmt_state": {k: v for k, v in full_state.items() if not k.startswith(prefix)}
    }
    if lora is None:
        parts["model_state"] = backbone
        return parts
    parts["adapter_state"] = get_adapter_state_dict(backbone)
    parts["adapter_config"] = adapter_config(lora)
    if final:
        parts["model_state"] = get_merged_lora_ckpt(backbone, rank=lora["rank"], alpha=lora["alpha"])
    return parts
