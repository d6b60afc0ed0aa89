"""Build the torchtune decoder that matches a Hugging Face ``config.json``, so a downloaded
HF checkpoint loads through torchtune's ``FullModelHFCheckpointer`` with nothing else to type."""

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from torchtune.models.llama3 import llama3
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TiedLinear, TransformerDecoder

# HF ``model_type`` -> torchtune checkpointer ``model_type`` (which picks the key converter).
CHECKPOINTER_MODEL_TYPES = {"llama": "LLAMA3", "mistral": "MISTRAL", "qwen2": "QWEN2"}


def read_hf_config(source: Union[str, Path, Mapping[str, Any]]) -> Dict[str, Any]:
    """``config.json`` as a dict, from a dict, the file, or the checkpoint directory."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json at {path}: point at a Hugging Face checkpoint directory."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is damaged.") from err


def rope_theta_of(config: Mapping[str, Any], default: float = 10_000.0) -> float:
    """RoPE base: transformers 4 writes ``rope_theta``, transformers 5 ``rope_parameters``."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", default))


def decoder_from_hf_config(
    source: Union[str, Path, Mapping[str, Any]], *, max_seq_len: Optional[int] = None
) -> TransformerDecoder:
    """A randomly initialised torchtune decoder with the architecture of an HF config
    (``llama``/``mistral`` without RoPE scaling, ``qwen2``); tied output embeddings included.

    Raises:
        ValueError: for architectures or RoPE scaling it does not cover, naming the field.
    """
    cfg = read_hf_config(source)
    kind = cfg.get("model_type")
    if kind not in CHECKPOINTER_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={kind!r} is not covered; use a torchtune builder for it as "
            f"`backbone` (covered here: {sorted(CHECKPOINTER_MODEL_TYPES)})."
        )
    scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type")
    if scaling not in (None, "default"):
        raise ValueError(
            f"config.json asks for RoPE scaling {scaling!r}; build the backbone with the matching "
            "torchtune builder (e.g. llama3_1/llama3_2) instead."
        )
    heads = cfg["num_attention_heads"]
    common = dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        embed_dim=cfg["hidden_size"],
        intermediate_dim=cfg["intermediate_size"],
        max_seq_len=max_seq_len or cfg.get("max_position_embeddings", 4096),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_base=rope_theta_of(cfg),
    )
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // heads:
        raise ValueError(
            f"config.json head_dim={head_dim} differs from hidden_size/num_attention_heads; "
            "this layout needs its own torchtune builder."
        )
    if kind == "qwen2":
        return qwen2(**common, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    decoder = llama3(**common)
    if cfg.get("tie_word_embeddings", False):
        # TiedLinear is not an nn.Module: drop the registered Linear before assigning it.
        delattr(decoder, "output")
        decoder.output = TiedLinear(decoder.tok_embeddings)
    return decoder


def checkpointer_model_type(source: Union[str, Path, Mapping[str, Any]]) -> str:
    """The ``model_type`` to give torchtune's HF checkpointer for this config."""
    return CHECKPOINTER_MODEL_TYPES[read_hf_config(source)["model_type"]]
