"""Loading weights into an HMT model in a recipe: the backbone through torchtune, the HMT
parameters from our files (or freshly drawn), LoRA bookkeeping. Shared by the single-device,
distributed, eval and generation recipes."""

import math
import os
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchtune.modules.peft import (
    DoRALinear,
    LoRALinear,
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
)

from hmt_plugin.checkpointing.hmt_files import (
    HMT_WEIGHTS,
    check_hmt_state_dict,
    load_hmt_checkpoint,
)
from hmt_plugin.checkpointing.io import ADAPTER_PT
from hmt_plugin.modules.hmt import HMT


def build_checkpointer(cfg_checkpointer: Any, hmt_checkpoint: Optional[str] = None, **kwargs: Any) -> Any:
    """``config.instantiate(cfg.checkpointer, **kwargs)``, with errors that say what to fix:
    torchtune's checkpointers fail on a missing directory or file with the path alone."""
    from torchtune import config

    try:
        return config.instantiate(cfg_checkpointer, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        where = kwargs.get("checkpoint_dir", cfg_checkpointer.get("checkpoint_dir"))
        hint = (
            "Point checkpointer.checkpoint_dir at the model's directory (config.json and the "
            "weight files) and list its files in checkpointer.checkpoint_files."
        )
        if hmt_checkpoint is not None and not Path(str(hmt_checkpoint)).exists():
            # A stage-2 config reads both the backbone and the HMT parameters from stage 1.
            hint = (
                f"hmt_checkpoint={str(hmt_checkpoint)!r} does not exist either: this stage-2 "
                "config reads the stage-1 run's `final` checkpoint. Run stage 1 first, or "
                "point checkpointer.checkpoint_dir and hmt_checkpoint at its output."
            )
        raise FileNotFoundError(
            f"checkpointer cannot read checkpoint_dir={str(where)!r}: {err} {hint}"
        ) from err


def load_backbone(checkpointer: Any) -> Dict[str, torch.Tensor]:
    """The backbone's weights (torchtune keys) from ``checkpointer.load_checkpoint()``; a
    truncated or damaged weight file, or one of another architecture, is named with the fix
    (torchtune names only the file or the key)."""
    try:
        return checkpointer.load_checkpoint()["model"]
    except Exception as err:
        if str(err).startswith("Error converting the state dict"):
            # torchtune's key conversion met a weight the model type does not have.
            model_type = getattr(getattr(checkpointer, "_model_type", None), "name", "?")
            raise ValueError(
                f"{str(err).strip()} The checkpoint is of another architecture than "
                f"checkpointer.model_type={model_type}: set "
                "checkpointer.model_type (and `model`) to the architecture in the checkpoint's "
                "config.json, or point the checkpointer at a checkpoint of this architecture."
            ) from err
        if not (isinstance(err, ValueError) and str(err).startswith("Unable to load checkpoint")):
            raise
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise ValueError(
            f"{str(err).strip()}{cause} The file is truncated or damaged (an interrupted "
            "download or copy?): download it again, or point the checkpointer at an intact copy."
        ) from err


def lora_settings(model: HMT) -> Optional[Dict[str, Any]]:
    """Rank, alpha and targets of the LoRA adapters in ``model``'s backbone, read from the
    modules themselves (the config may nest them under ``backbone``), or None without LoRA."""
    adapters = {
        name: m for name, m in model.backbone.named_modules() if isinstance(m, (LoRALinear, DoRALinear))
    }
    if not adapters:
        return None
    # LoRALinear keeps rank and alpha; DoRALinear only lora_a's width and alpha / rank.
    ranks = {m.lora_a.out_features for m in adapters.values()}
    alphas = {
        m.alpha if hasattr(m, "alpha") else round(m.scaling * m.lora_a.out_features, 6)
        for m in adapters.values()
    }
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


def optimizer_params(model: nn.Module, hmt_lr: Optional[float] = None) -> List[Any]:
    """What a recipe hands its optimizer: the trainable parameters, or with ``hmt_lr`` two
    parameter groups, the backbone's (at ``optimizer.lr``) and HMT's own (initial memory,
    summary token, recall projections, sink, memory norm) at ``hmt_lr``.

    Why a second rate: the HMT parameters start from scratch while the backbone is already
    trained; at a fine-tuning rate (5e-5) AdamW moves each of them by about that much per
    step, so in a short run the recall projections stay where they were initialised. LR
    schedulers scale both groups by the same factor.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if hmt_lr is None:
        return [p for _, p in trainable]
    hmt_names = set(model.hmt_parameter_names())
    backbone = [p for n, p in trainable if n not in hmt_names]
    hmt = [p for n, p in trainable if n in hmt_names]
    return [{"params": backbone}, {"params": hmt, "lr": hmt_lr}]


def fresh_adapter_state(model: HMT, seed: int) -> Dict[str, torch.Tensor]:
    """Initial LoRA weights as full CPU tensors, drawn per parameter from ``(seed, name)``:
    ``lora_a`` as torchtune draws it (Kaiming-uniform), ``lora_b`` zero. The same on one device
    and on N ranks of a model built on the meta device, so their runs compute the same losses."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_a." in name:
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            value = torch.empty(param.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=g)
            out[name] = value
        elif ".lora_b." in name:
            out[name] = torch.zeros(param.shape, dtype=torch.float32)
    return out


def state_dict_shapes(model: torch.nn.Module) -> Dict[str, tuple]:
    """Keys and shapes of ``model.state_dict()`` without calling it: with NF4 base weights
    (QLoRA) torchtune's state-dict hook would dequantize the whole model to read shapes."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                shapes[f"{module_name}.{name}" if module_name else name] = tuple(buf.shape)
    return shapes


def initial_state_dict(
    model: HMT,
    base_state: Dict[str, torch.Tensor],
    *,
    lora: Optional[Dict[str, Any]],
    seed: int,
    adapter_state: Optional[Dict[str, torch.Tensor]] = None,
    hmt_checkpoint: Optional[os.PathLike] = None,
) -> Dict[str, torch.Tensor]:
    """Everything a freshly built model (possibly on the meta device) is loaded with, as one
    full state dict in the wrapper's keys:

    * the backbone's base weights (torchtune keys from a torchtune checkpointer);
    * LoRA adapters: ``adapter_state`` (torchtune keys, when resuming) or fresh ones;
    * HMT parameters: initialised from the token embeddings (``config.memory_init``;
      seeded), then overlaid by ``hmt_checkpoint`` if given (a stage-1 checkpoint leaves
      the recall parameters fresh: the paper's stage 2).

    Raises:
        KeyError / FileNotFoundError / HMTCheckpointError: naming what does not fit.
    """
    shapes = state_dict_shapes(model)
    expected = set(shapes)
    full = {f"backbone.{k}": v for k, v in base_state.items()}
    if lora is not None:
        if adapter_state:
            full.update({f"backbone.{k}": v for k, v in adapter_state.items()})
        else:
            full.update(fresh_adapter_state(model, seed))
    embedding = base_state.get("tok_embeddings.weight")
    if embedding is None:
        raise KeyError(
            "the backbone checkpoint has no 'tok_embeddings.weight'; check the checkpointer's "
            "model_type and files."
        )
    # The backbone's shapes first: the HMT parameters are drawn from its embeddings.
    _check_shapes({k: v for k, v in full.items() if k in shapes}, shapes)
    hmt_state = model.fresh_hmt_state_dict(
        embedding, generator=torch.Generator().manual_seed(seed)
    )
    if hmt_checkpoint is not None:
        path = Path(hmt_checkpoint)
        if not (path / HMT_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"hmt_checkpoint={str(path)!r} holds no {HMT_WEIGHTS}. Point it at a checkpoint "
                "directory of an earlier run (e.g. the stage-1 run's `final` directory), or set "
                "hmt_checkpoint=null to start the HMT parameters fresh."
            )
        saved, _, _ = load_hmt_checkpoint(path)
        check_hmt_state_dict(model, saved, source=str(path / HMT_WEIGHTS))
        hmt_state.update(saved)
    full.update(hmt_state)
    # DoRA magnitudes are computed from the loaded base weights (torchtune does it after load).
    dora = {k for k in expected if k.endswith(".magnitude")}
    missing = sorted(expected - set(full) - dora)
    unexpected = sorted(set(full) - expected)
    if missing or unexpected:
        raise KeyError(
            "the checkpoint does not fit the configured model: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}. Check that "
            "`model` and `checkpointer` describe the same architecture and size."
        )
    _check_shapes(full, shapes)
    return full


def _check_shapes(state: Dict[str, torch.Tensor], shapes: Dict[str, tuple]) -> None:
    for key, value in state.items():
        want = shapes[key]
        if tuple(value.shape) != want:
            raise KeyError(
                f"{key!r} has shape {tuple(value.shape)} in the checkpoint but {want} in the "
                "configured model; the checkpoint is for another size. Set the dimensions in "
                "`model` to the checkpoint's (see its config.json), or point the checkpointer at "
                "a checkpoint of this size."
            )


def load_adapter_state(directory: os.PathLike) -> Dict[str, torch.Tensor]:
    """The LoRA adapter kept in a checkpoint directory (``adapter_model.pt``: a step
    checkpoint's, or a published LoRA checkpoint converted with ``--lora keep``), in the
    backbone's torchtune keys."""
    adapter = torch.load(Path(directory) / ADAPTER_PT, map_location="cpu", weights_only=True)
    return {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in adapter.items()}


def starting_state_dict(
    model: HMT,
    checkpointer: Any,
    cfg_checkpointer: Any,
    *,
    lora: Optional[Dict[str, Any]],
    seed: int,
    resume_from: Optional[Path],
    hmt_checkpoint: Optional[os.PathLike],
) -> Dict[str, torch.Tensor]:
    """What a fine-tuning recipe's model starts from (:func:`initial_state_dict`): the
    backbone from ``checkpointer``, or when resuming a full fine-tune from the step
    checkpoint ``resume_from``; the adapters of ``resume_from`` when resuming a LoRA run,
    else fresh ones; the HMT parameters of ``resume_from``, else of ``hmt_checkpoint``, else
    fresh ones."""
    base_state = load_backbone(checkpointer)
    adapter_state = None
    if resume_from is not None:
        if lora is None:
            # Full fine-tune: the step checkpoint holds the whole backbone.
            resumed = build_checkpointer(
                cfg_checkpointer,
                checkpoint_dir=str(resume_from),
                checkpoint_files=sorted(p.name for p in resume_from.glob("model-*.safetensors")),
                should_load_recipe_state=False,
            )
            base_state = load_backbone(resumed)
        else:
            adapter_state = load_adapter_state(resume_from)
    return initial_state_dict(
        model, base_state, lora=lora, seed=seed, adapter_state=adapter_state,
        hmt_checkpoint=resume_from if resume_from is not None else hmt_checkpoint,
    )


def load_initial_state(model: HMT, full: Dict[str, torch.Tensor], lora: Optional[Dict[str, Any]]) -> None:
    """Single device: load :func:`initial_state_dict`'s result into ``model``."""
    model.load_state_dict(full, strict=False)
    if lora is not None and lora["is_dora"]:
        # Fresh DoRA magnitudes come from the loaded base weights; resumed ones are trained.
        for name, m in model.named_modules():
            if hasattr(m, "initialize_dora_magnitude") and f"{name}.magnitude" not in full:
                m.initialize_dora_magnitude()


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
