"""Build the torchtune decoder that matches a Hugging Face ``config.json``, so a downloaded
HF checkpoint loads through torchtune's ``FullModelHFCheckpointer`` with nothing else to type.

Every architecture goes through torchtune's own component builders (``llama3``,
``llama3_1``, ``qwen2``, ``mistral``, ``gemma``, ``gemma2`` and their ``lora_*`` variants);
this module only maps ``config.json`` fields to their arguments and refuses what they cannot
express, naming the field."""

from typing import Any, Callable, Dict, List, Mapping, Optional

from torchtune.models.gemma import gemma, lora_gemma
from torchtune.models.gemma2 import gemma2, lora_gemma2
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.models.llama3_1 import Llama3ScaledRoPE, llama3_1, lora_llama3_1
from torchtune.models.mistral import lora_mistral, mistral
from torchtune.models.qwen2 import lora_qwen2, qwen2
from torchtune.modules import TiedLinear, TransformerDecoder

from hmt_plugin.checkpointing.hf_config import (
    HFConfigSource,
    read_hf_config,
    rope_scaling_of,
    rope_theta_of,
)

# HF ``model_type`` -> torchtune checkpointer ``model_type`` (which picks the key converter).
CHECKPOINTER_MODEL_TYPES = {
    "llama": "LLAMA3",
    "mistral": "MISTRAL",
    "qwen2": "QWEN2",
    "gemma": "GEMMA",
    "gemma2": "GEMMA2",
}

# Llama-3 RoPE scaling as torchtune's ``llama3_1`` builder fixes it (only the factor varies).
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


def checkpointer_model_type(source: HFConfigSource) -> str:
    """The ``model_type`` to give torchtune's HF checkpointer for this config."""
    return CHECKPOINTER_MODEL_TYPES[_covered_kind(read_hf_config(source))]


def decoder_from_hf_config(
    source: HFConfigSource,
    *,
    max_seq_len: Optional[int] = None,
    lora: Optional[Mapping[str, Any]] = None,
) -> TransformerDecoder:
    """A randomly initialised torchtune decoder with the architecture of an HF config.

    Covered (``model_type``): ``llama`` (plain or Llama-3 scaled RoPE, tied or untied output),
    ``mistral``, ``qwen2``, ``gemma``, ``gemma2``.

    Args:
        source: ``config.json`` as a dict, its path, or the checkpoint directory.
        max_seq_len: longest sequence one call reads (default ``max_position_embeddings``;
            Mistral and sliding-window Qwen2 are capped at ``sliding_window``, which
            torchtune's builders do not implement).
        lora: torchtune's LoRA builder arguments (``lora_attn_modules``,
            ``apply_lora_to_mlp``, ``apply_lora_to_output``, ``lora_rank``, ``lora_alpha``,
            ``lora_dropout``, ``use_dora``, ``quantize_base``) for the ``lora_*`` builder of the
            same family; None builds the plain decoder.

    Raises:
        ValueError: for architectures, RoPE scalings or options the builders cannot express,
            naming the field and what is covered.
    """
    cfg = read_hf_config(source)
    kind = _covered_kind(cfg)
    lora = dict(lora) if lora is not None else None
    tied = bool(cfg.get("tie_word_embeddings", kind in ("gemma", "gemma2")))
    if lora is not None and lora.get("apply_lora_to_output") and tied:
        raise ValueError(
            f"apply_lora_to_output=true, but this {kind} model ties its output projection to the "
            "token embeddings (tie_word_embeddings), which LoRA cannot adapt separately; set "
            "apply_lora_to_output: false."
        )
    if lora is not None and lora.get("quantize_base"):
        _check_nf4_shapes(cfg, lora, tied)
    return _FAMILIES[kind](cfg, max_seq_len, lora, tied)


# torchao's NF4 (torchtune's QLoRA) quantizes in blocks of 64 values with one scale per block,
# and those scales in blocks of 256: a quantized weight needs a multiple of 64 * 256 elements.
NF4_ELEMENTS = 64 * 256


def _check_nf4_shapes(cfg: Mapping[str, Any], lora: Mapping[str, Any], tied: bool) -> None:
    """Refuse QLoRA up front for a model whose projections NF4 cannot hold (torchao fails
    deep inside the build with "Number of scalers must be divisible by scaler block size")."""
    d = int(_required(cfg, "hidden_size"))
    heads = int(_required(cfg, "num_attention_heads"))
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or d // heads)
    f = int(_required(cfg, "intermediate_size"))
    shapes = {"attn.q_proj": (heads * hd, d), "attn.k_proj": (kv * hd, d),
              "attn.v_proj": (kv * hd, d), "attn.output_proj": (d, heads * hd),
              "mlp.w1/w3": (f, d), "mlp.w2": (d, f)}
    if lora.get("apply_lora_to_output") and not tied:
        shapes["output"] = (int(_required(cfg, "vocab_size")), d)
    bad = {name: shape for name, shape in shapes.items() if (shape[0] * shape[1]) % NF4_ELEMENTS}
    if bad:
        listed = ", ".join(f"{n} {a} x {b} = {a * b:,}" for n, (a, b) in bad.items())
        raise ValueError(
            f"quantize_base=true (QLoRA): NF4 needs every quantized weight to hold a multiple of "
            f"{NF4_ELEMENTS:,} elements (64 x 256 blocks); this model's {listed} do not. Use "
            "LoRA without quantize_base for it."
        )


# ---------------------------------------------------------------------------------- families


def _covered_kind(cfg: Mapping[str, Any]) -> str:
    kind = cfg.get("model_type")
    if kind not in CHECKPOINTER_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={kind!r} is not covered; covered: "
            f"{', '.join(sorted(CHECKPOINTER_MODEL_TYPES))}. For another architecture give "
            "`backbone` a torchtune builder for it."
        )
    return kind


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"config.json has no {key!r}; the checkpoint's config is incomplete.")
    return cfg[key]


def _sizes(cfg: Mapping[str, Any], max_seq_len: Optional[int], norm_eps: float) -> Dict[str, Any]:
    """The arguments every family's builder takes, read from the config."""
    heads = int(_required(cfg, "num_attention_heads"))
    return dict(
        vocab_size=int(_required(cfg, "vocab_size")),
        num_layers=int(_required(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        embed_dim=int(_required(cfg, "hidden_size")),
        intermediate_dim=int(_required(cfg, "intermediate_size")),
        max_seq_len=int(max_seq_len or cfg.get("max_position_embeddings") or 4096),
        norm_eps=float(cfg.get("rms_norm_eps") or norm_eps),
        rope_base=rope_theta_of(cfg),
    )


def _head_dim_is_default(cfg: Mapping[str, Any], kind: str) -> None:
    """Llama, Mistral and Qwen2 builders derive head_dim = hidden_size / heads."""
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError(
            f"config.json head_dim={head_dim} differs from hidden_size/num_attention_heads "
            f"({cfg['hidden_size']}/{cfg['num_attention_heads']}); torchtune's {kind} builder "
            "cannot express that layout."
        )


def _silu_no_bias(cfg: Mapping[str, Any], kind: str) -> None:
    """What torchtune's Llama-style builders hard-code: SiLU gating, no projection biases."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"config.json hidden_act={act!r}; torchtune's {kind} builder uses 'silu' only."
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(
            f"config.json sets attention_bias/mlp_bias; torchtune's {kind} builder has no bias "
            "in those projections, so this checkpoint is not covered."
        )


def _build(plain: Callable, with_lora: Callable, lora: Optional[Dict[str, Any]], **kwargs: Any):
    return plain(**kwargs) if lora is None else with_lora(**lora, **kwargs)


def _capped_at_window(sizes: Dict[str, Any], window: int, explicit: Optional[int], kind: str) -> None:
    """torchtune's Mistral/Qwen2 attend over the whole sequence, which is what a sliding window
    of ``window`` computes as long as no call reads more than ``window`` tokens."""
    if explicit is not None and explicit > window:
        raise ValueError(
            f"max_seq_len={explicit} exceeds this {kind} model's sliding_window={window}, and "
            f"torchtune's {kind} has no sliding-window attention; use max_seq_len <= {window} "
            "(HMT reads segment_length tokens per call)."
        )
    sizes["max_seq_len"] = min(sizes["max_seq_len"], window)


def _tie_output(decoder: TransformerDecoder) -> TransformerDecoder:
    # TiedLinear is not an nn.Module: drop the registered Linear before assigning it.
    delattr(decoder, "output")
    decoder.output = TiedLinear(decoder.tok_embeddings)
    return decoder


def _llama(cfg, max_seq_len, lora, tied) -> TransformerDecoder:
    _head_dim_is_default(cfg, "llama")
    _silu_no_bias(cfg, "llama")
    sizes = _sizes(cfg, max_seq_len, 1e-5)
    scaling = rope_scaling_of(cfg)
    if scaling is None:
        decoder = _build(llama3, lora_llama3, lora, **sizes)
    elif scaling["rope_type"] == "llama3":
        decoder = _build(llama3_1, lora_llama3_1, lora, scale_factor=float(scaling["factor"]),
                         **sizes)
        shape = {k: float(scaling.get(k, v)) for k, v in _LLAMA3_ROPE_DEFAULTS.items()}
        if shape != _LLAMA3_ROPE_DEFAULTS:
            # llama3_1 fixes these three; a config that changes them gets the same torchtune
            # RoPE class with its own values, shared by every layer as the builder shares it.
            rope = Llama3ScaledRoPE(
                dim=sizes["embed_dim"] // sizes["num_heads"],
                max_seq_len=sizes["max_seq_len"],
                base=sizes["rope_base"],
                scale_factor=float(scaling["factor"]),
                low_freq_factor=shape["low_freq_factor"],
                high_freq_factor=shape["high_freq_factor"],
                old_context_len=int(shape["original_max_position_embeddings"]),
            )
            for layer in decoder.layers:
                layer.attn.pos_embeddings = rope
    else:
        raise ValueError(
            f"config.json asks for RoPE scaling rope_type={scaling['rope_type']!r}; covered: none "
            "(plain RoPE) and 'llama3' (torchtune's Llama3ScaledRoPE)."
        )
    return _tie_output(decoder) if tied else decoder


def _mistral(cfg, max_seq_len, lora, tied) -> TransformerDecoder:
    _head_dim_is_default(cfg, "mistral")
    _silu_no_bias(cfg, "mistral")
    if rope_scaling_of(cfg) is not None:
        raise ValueError("config.json asks for RoPE scaling, which torchtune's mistral lacks.")
    sizes = _sizes(cfg, max_seq_len, 1e-5)
    if cfg.get("sliding_window"):
        _capped_at_window(sizes, int(cfg["sliding_window"]), max_seq_len, "mistral")
    decoder = _build(mistral, lora_mistral, lora, **sizes)
    return _tie_output(decoder) if tied else decoder


def _qwen2(cfg, max_seq_len, lora, tied) -> TransformerDecoder:
    _head_dim_is_default(cfg, "qwen2")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={cfg['hidden_act']!r}; torchtune's qwen2 uses 'silu'.")
    if rope_scaling_of(cfg) is not None:
        raise ValueError("config.json asks for RoPE scaling, which torchtune's qwen2 lacks.")
    sizes = _sizes(cfg, max_seq_len, 1e-6)
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        _capped_at_window(sizes, int(cfg["sliding_window"]), max_seq_len, "qwen2")
    return _build(qwen2, lora_qwen2, lora, tie_word_embeddings=tied, **sizes)


def _gemma_lora(lora: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    # lora_gemma/lora_gemma2 take no apply_lora_to_output: the output is always tied.
    if lora is not None:
        lora.pop("apply_lora_to_output", None)
    return lora


def _gemma_sizes(cfg, max_seq_len) -> Dict[str, Any]:
    if cfg.get("tie_word_embeddings") is False:
        raise ValueError("config.json unties Gemma's output projection; torchtune's gemma ties it.")
    sizes = _sizes(cfg, max_seq_len, 1e-6)
    sizes["head_dim"] = int(cfg.get("head_dim") or sizes["embed_dim"] // sizes["num_heads"])
    return sizes


def _gemma(cfg, max_seq_len, lora, tied) -> TransformerDecoder:
    return _build(gemma, lora_gemma, _gemma_lora(lora), **_gemma_sizes(cfg, max_seq_len))


def _gemma2(cfg, max_seq_len, lora, tied) -> TransformerDecoder:
    sizes = _gemma_sizes(cfg, max_seq_len)
    extra = dict(
        hidden_capping_value=cfg.get("attn_logit_softcapping", 50.0),
        final_capping_value=cfg.get("final_logit_softcapping", 30.0),
        sliding_window_size=cfg.get("sliding_window", 4096),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
    )
    return _build(gemma2, lora_gemma2, _gemma_lora(lora), **extra, **sizes)


_FAMILIES: Dict[str, Callable[..., TransformerDecoder]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gemma": _gemma,
    "gemma2": _gemma2,
}
COVERED_ARCHITECTURES: List[str] = sorted(_FAMILIES)
