"""The backbone builder for YAML that takes a Hugging Face checkpoint directory."""

from pathlib import Path
from typing import List, Optional, Union

from torchtune.modules import TransformerDecoder

from hmt_plugin.checkpointing.hf_backbone import decoder_from_hf_config

_LORA_ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")


def hf_backbone(
    checkpoint_dir: Union[str, Path],
    *,
    max_seq_len: Optional[int] = None,
    lora_attn_modules: Optional[List[str]] = None,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """The torchtune decoder that ``<checkpoint_dir>/config.json`` describes (weights are
    loaded by the recipe's checkpointer, e.g. :func:`~hmt_plugin.checkpointing.hf_checkpointer`
    on the same directory)::

        model:
          _component_: hmt_plugin.models.hmt
          backbone:
            _component_: hmt_plugin.models.hf_backbone
            checkpoint_dir: ${backbone_dir}
            lora_attn_modules: [q_proj, v_proj]   # omit for the plain decoder
            apply_lora_to_mlp: true
            quantize_base: false                  # true: QLoRA (NF4 base weights)

    Covered ``model_type``: llama (plain or Llama-3 scaled RoPE, tied or untied output),
    mistral, qwen2, gemma, gemma2; anything else is refused, naming it.

    Args:
        checkpoint_dir: the HF checkpoint directory (or its ``config.json``).
        max_seq_len: longest sequence one backbone call reads (default: the config's
            ``max_position_embeddings``); HMT reads ``segment_length`` per call.
        lora_attn_modules: attention projections to adapt (``q_proj``, ``k_proj``, ``v_proj``,
            ``output_proj``; torchtune needs at least one); None builds the decoder without
            LoRA.
        apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora,
            quantize_base: torchtune's LoRA arguments (``quantize_base``: QLoRA).

    Raises:
        ValueError: LoRA options without ``lora_attn_modules``, an unknown projection name, or a
            config the builders do not cover.
    """
    if lora_attn_modules is None:
        asked = [name for name, on in (("apply_lora_to_mlp", apply_lora_to_mlp),
                                       ("apply_lora_to_output", apply_lora_to_output),
                                       ("use_dora", use_dora), ("quantize_base", quantize_base)) if on]
        if asked:
            raise ValueError(
                f"backbone.{asked[0]}=true needs LoRA: give backbone.lora_attn_modules (e.g. "
                "[q_proj, v_proj])."
            )
        return decoder_from_hf_config(checkpoint_dir, max_seq_len=max_seq_len)
    modules = [str(m) for m in lora_attn_modules]
    unknown = sorted(set(modules) - set(_LORA_ATTN))
    if unknown or not modules:
        raise ValueError(
            f"backbone.lora_attn_modules={modules}"
            + (f" has {unknown}" if unknown else " is empty")
            + f"; choose one or more of {list(_LORA_ATTN)}."
        )
    lora = dict(
        lora_attn_modules=modules,
        apply_lora_to_mlp=bool(apply_lora_to_mlp),
        apply_lora_to_output=bool(apply_lora_to_output),
        lora_rank=int(lora_rank),
        lora_alpha=float(lora_alpha),
        lora_dropout=float(lora_dropout),
        use_dora=bool(use_dora),
        quantize_base=bool(quantize_base),
    )
    return decoder_from_hf_config(checkpoint_dir, max_seq_len=max_seq_len, lora=lora)
