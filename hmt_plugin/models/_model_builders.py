"""Named HMT builders, in the style of torchtune's ``_model_builders.py``.

Each takes the HMT settings of :func:`~hmt_plugin.models.hmt` as keyword arguments; the
LoRA ones also take torchtune's LoRA arguments. The HMT parameters are trainable in LoRA
setups (``HMT.adapter_params``)."""

from functools import partial
from typing import Any, List

from torchtune.models.llama2 import llama2_7b, lora_llama2_7b
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.models.llama3_2 import llama3_2_1b, lora_llama3_2_1b
from torchtune.models.qwen2_5 import lora_qwen2_5_0_5b, qwen2_5_0_5b
from torchtune.modules.peft import LORA_ATTN_MODULES

from hmt_plugin.models._hmt_builder import hmt
from hmt_plugin.modules.hmt import HMT


def hmt_llama2_7b(**hmt_settings: Any) -> HMT:
    """HMT around Llama 2 7B (:func:`torchtune.models.llama2.llama2_7b`)."""
    return hmt(llama2_7b(), **hmt_settings)


def lora_hmt_llama2_7b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **hmt_settings: Any,
) -> HMT:
    """HMT around Llama 2 7B with LoRA (:func:`torchtune.models.llama2.lora_llama2_7b`)."""
    backbone = lora_llama2_7b(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return hmt(backbone, **hmt_settings)


def hmt_llama3_2_1b(**hmt_settings: Any) -> HMT:
    """HMT around Llama 3.2 1B (tied embeddings)."""
    return hmt(llama3_2_1b(), **hmt_settings)


def lora_hmt_llama3_2_1b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **hmt_settings: Any,
) -> HMT:
    """HMT around Llama 3.2 1B with LoRA."""
    backbone = lora_llama3_2_1b(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return hmt(backbone, **hmt_settings)


def hmt_qwen2_5_0_5b(**hmt_settings: Any) -> HMT:
    """HMT around Qwen2.5 0.5B (tied embeddings)."""
    return hmt(qwen2_5_0_5b(), **hmt_settings)


def lora_hmt_qwen2_5_0_5b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **hmt_settings: Any,
) -> HMT:
    """HMT around Qwen2.5 0.5B with LoRA."""
    backbone = lora_qwen2_5_0_5b(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return hmt(backbone, **hmt_settings)


def hmt_tiny(
    vocab_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    **hmt_settings: Any,
) -> HMT:
    """A tiny Llama-architecture HMT for tests, demos and CPU runs (torchtune's ``llama3``
    component builder, which takes ``rope_base``; untied output like Llama 2)."""
    backbone = llama3(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
    )
    return hmt(backbone, **hmt_settings)


def lora_hmt_tiny(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    vocab_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    **hmt_settings: Any,
) -> HMT:
    """:func:`hmt_tiny` with LoRA adapters."""
    backbone = lora_llama3(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return hmt(backbone, **hmt_settings)


qlora_hmt_llama2_7b = partial(lora_hmt_llama2_7b, quantize_base=True)
qlora_hmt_llama2_7b.__doc__ = "QLoRA: :func:`lora_hmt_llama2_7b` with NF4 base weights."
qlora_hmt_llama3_2_1b = partial(lora_hmt_llama3_2_1b, quantize_base=True)
qlora_hmt_llama3_2_1b.__doc__ = "QLoRA: :func:`lora_hmt_llama3_2_1b` with NF4 base weights."
qlora_hmt_qwen2_5_0_5b = partial(lora_hmt_qwen2_5_0_5b, quantize_base=True)
qlora_hmt_qwen2_5_0_5b.__doc__ = "QLoRA: :func:`lora_hmt_qwen2_5_0_5b` with NF4 base weights."
qlora_hmt_tiny = partial(lora_hmt_tiny, quantize_base=True)
qlora_hmt_tiny.__doc__ = "QLoRA: :func:`lora_hmt_tiny` with NF4 base weights."
