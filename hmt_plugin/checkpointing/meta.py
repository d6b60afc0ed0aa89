"""Meta's consolidated Llama format (``consolidated.00.pth`` + ``params.json``), to and from
our checkpoint directories, through torchtune's own ``tune_to_meta`` / ``meta_to_tune`` key
converters. ``convert_to_meta`` holds one full copy of the model (``torch.save`` writes the
file in one go); ``convert_from_meta`` reads lazily and writes HF shards one at a time.
"""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torchtune.models import convert_weights

from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.hf_config import (
    GIVE_THE_BACKBONE_CONFIG,
    HF_CONFIG,
    HFConfigFile,
    read_hf_config_file,
    rope_theta_of,
)
from hmt_plugin.checkpointing.hmt_files import HMT_CONFIG, copy_hmt_files, open_our_checkpoint
from hmt_plugin.checkpointing.io import (
    ADAPTER_PT,
    ADAPTER_SAFETENSORS,
    DEFAULT_MAX_SHARD_SIZE,
    ConversionError,
    ConversionResult,
    PathLike,
    ShardWriter,
    copy_side_files,
    open_state_dict,
    progress,
    staged_directory,
)
from hmt_plugin.checkpointing.peft_keys import ADAPTER_CONFIG

META_WEIGHTS = "consolidated.00.pth"
META_PARAMS = "params.json"


def _meta_ffn_dim(dim: int, multiple_of: int, multiplier: Optional[float]) -> int:
    """The FFN width Meta's Llama code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params_from_hf(cfg: Mapping[str, Any], layout: BackboneLayout) -> Dict[str, Any]:
    """``params.json`` for Meta's Llama code. It has no FFN width, only ``multiple_of`` and
    ``ffn_dim_multiplier``: Meta's usual 256 when that reproduces ``intermediate_size``, else
    values chosen to reproduce it."""
    hidden = layout.intermediate_dim
    multiple_of, multiplier = 256, None
    if _meta_ffn_dim(layout.dim, multiple_of, multiplier) != hidden:
        base = int(2 * (4 * layout.dim) / 3)
        multiple_of = hidden
        multiplier = None if base <= hidden else (hidden - 0.5) / base
    assert _meta_ffn_dim(layout.dim, multiple_of, multiplier) == hidden
    params = {
        "dim": layout.dim,
        "n_layers": layout.num_layers,
        "n_heads": layout.num_heads,
        "n_kv_heads": layout.num_kv_heads,
        "vocab_size": layout.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_theta": rope_theta_of(cfg),
    }
    # transformers 4 writes rope_scaling, transformers 5 rope_parameters.
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if scaling.get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    return params


def hf_config_from_meta(params: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]],
                        dtype: torch.dtype, max_seq_len: Optional[int] = None) -> Dict[str, Any]:
    """An HF ``LlamaForCausalLM`` config.json from Meta's params.json and the tensor shapes
    (params.json gives no FFN width or, in Llama 2, vocabulary size)."""
    if params.get("use_scaled_rope"):
        raise ConversionError(
            "params.json sets use_scaled_rope (Llama 3.1+): give the model's HF config.json "
            "(--hf_config), whose rope_scaling block this converter cannot invent."
        )
    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if key not in shapes:
            raise ConversionError(f"missing key {key!r}: not a Meta Llama checkpoint.")
    vocab, dim = shapes["tok_embeddings.weight"]
    heads = int(params["n_heads"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(dim),
        "intermediate_size": int(shapes["layers.0.feed_forward.w1.weight"][0]),
        "num_hidden_layers": int(params["n_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or heads),
        "vocab_size": int(vocab),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(max_seq_len or 4096),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def _require_llama(layout: BackboneLayout) -> None:
    if layout.model_type != "llama":
        raise ConversionError(
            f"Meta's format is Llama's; {layout.source} has model_type={layout.model_type!r}. "
            "Use export-hf for this backbone."
        )


def convert_to_meta(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    *,
    lora: str = "merge",
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionResult:
    """One of our checkpoint directories (Llama backbone) -> Meta's layout:
    ``consolidated.00.pth`` (torchtune's ``tune_to_meta`` keys) + ``params.json``, with
    ``config.json`` (for the way back), the HMT files and small side files beside.

    Args:
        lora: ``"merge"`` a LoRA adapter into the weights, or ``"keep"`` its torchtune files
            beside (torchtune's layout is Meta's, so they apply to these weights as they are).
    """
    if lora not in ("merge", "keep"):
        raise ValueError(f"lora={lora!r}: use 'merge' or 'keep'.")
    ours = open_our_checkpoint(checkpoint_dir)
    layout = ours.layout
    _require_llama(layout)
    result = ConversionResult(Path(output_dir))
    merge = ours.adapter if lora == "merge" else None
    meta_sd: Dict[str, torch.Tensor] = {}
    for hf_key in progress(layout.ordered(ours.backbone.keys()), desc="to-meta", enabled=show_progress):
        converted = layout.hf_to_tune(hf_key, ours.backbone.get(hf_key))
        if converted is None:
            continue
        tune_key, tensor = converted
        if merge is not None:
            tensor = merge.merge_into(tune_key, tensor)
        meta_sd.update(convert_weights.tune_to_meta({tune_key: tensor}))
    if "output.weight" not in meta_sd:
        # Meta's code always has an output projection; tied models share the embeddings.
        meta_sd["output.weight"] = meta_sd["tok_embeddings.weight"]
        result.note("tied embeddings: output.weight written as the token embeddings.")
    if merge is not None:
        result.note(f"LoRA adapter (r={merge.rank}, alpha={merge.alpha}) merged.")
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        torch.save(meta_sd, stage / META_WEIGHTS)
        del meta_sd
        (stage / META_PARAMS).write_text(json.dumps(meta_params_from_hf(ours.config, layout), indent=2))
        (stage / HF_CONFIG).write_bytes(ours.config_bytes)
        copy_side_files(ours.directory, stage, skip=(HMT_CONFIG, ADAPTER_CONFIG, META_PARAMS, HF_CONFIG))
        copy_hmt_files(ours.directory, stage)
        if ours.adapter is not None and merge is None:
            for name in (ADAPTER_PT, ADAPTER_SAFETENSORS, ADAPTER_CONFIG):
                if (ours.directory / name).is_file():
                    shutil.copy2(ours.directory / name, stage / name)
    return result


def _meta_weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    if not source.is_dir():
        raise ConversionError(f"{source} does not exist.")
    files = sorted(source.glob("*.pth"))
    if len(files) > 1:
        raise ConversionError(
            f"{source} holds {len(files)} .pth files ({files[0].name}, ...): model-parallel shards "
            "of a Meta checkpoint; merge them into one consolidated.00.pth first (torchtune reads "
            "one file as well)."
        )
    if not files:
        raise ConversionError(f"{source} holds no {META_WEIGHTS}.")
    return files[0]


def _meta_to_hf_key(meta_key: str, layout: BackboneLayout, where: Path) -> Optional[str]:
    if meta_key == "rope.freqs":
        return None
    try:
        tune_key = convert_weights.get_mapped_key(meta_key, convert_weights._FROM_META)
        return layout.tune_key_to_hf(tune_key)
    except Exception as err:  # noqa: BLE001 - torchtune raises a bare Exception
        raise ConversionError(f"unexpected key {meta_key!r} in {where}: not a Meta Llama key.") from err


def convert_from_meta(
    meta_dir: PathLike,
    output_dir: PathLike,
    *,
    hf_config: Union[None, PathLike, Mapping[str, Any]] = None,
    max_seq_len: Optional[int] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionResult:
    """Meta's layout (``consolidated.00.pth`` + ``params.json``) -> our checkpoint directory
    (HF shards via torchtune's ``meta_to_tune`` and ``tune_to_hf``), carrying HMT, adapter and
    side files found beside.

    Args:
        hf_config: the HF config.json to write; default the ``config.json`` beside the weights
            (written by :func:`convert_to_meta`), else one derived from ``params.json`` and
            the tensor shapes.
        max_seq_len: ``max_position_embeddings`` of a derived config (default 4096).
    """
    meta_dir = Path(meta_dir)
    weights = _meta_weights_file(meta_dir)
    folder = weights.parent
    result = ConversionResult(Path(output_dir))
    source = open_state_dict(weights)
    if hf_config is None and (folder / HF_CONFIG).is_file():
        hf_config = folder / HF_CONFIG
    if hf_config is not None:
        hf = read_hf_config_file(hf_config, hint=GIVE_THE_BACKBONE_CONFIG)
    else:
        params_path = folder / META_PARAMS
        if not params_path.is_file():
            raise ConversionError(f"{folder} has neither config.json nor {META_PARAMS}; give --hf_config.")
        try:
            params = json.loads(params_path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{params_path} is not valid JSON ({err}).") from err
        dtype = source.dtype("tok_embeddings.weight") if "tok_embeddings.weight" in source else torch.float32
        cfg = hf_config_from_meta(params, source.shapes(), dtype, max_seq_len)
        hf = HFConfigFile(cfg, json.dumps(cfg, indent=2).encode(), f"config derived from {params_path}")
        result.note(f"config.json derived from {params_path} and the tensor shapes.")
    layout = BackboneLayout.from_hf_config(hf.values, source=hf.name)
    _require_llama(layout)
    names = {k: _meta_to_hf_key(k, layout, weights) for k in source.keys()}
    names = {k: v for k, v in names.items() if v is not None}
    if layout.tie_word_embeddings and "output.weight" in names:
        # HF files of tied models have no lm_head; convert_to_meta wrote the embeddings there.
        del names["output.weight"]
    layout.check({hf: source.shape(k) for k, hf in names.items()}, str(weights))
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        for meta_key in progress(list(names), desc="from-meta", enabled=show_progress):
            tune = convert_weights.meta_to_tune({meta_key: source.get(meta_key)})
            tune_key, tensor = next(iter(tune.items()))
            writer.add(*layout.tune_to_hf(tune_key, tensor))
        writer.close()
        (stage / HF_CONFIG).write_bytes(hf.raw)
        copy_side_files(folder, stage, skip=(META_PARAMS, HF_CONFIG))
        copy_hmt_files(folder, stage)
        for name in (ADAPTER_PT, ADAPTER_SAFETENSORS):
            if (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)
    return result
