"""The tensors a Hugging Face ``config.json`` promises, checked against a checkpoint, and
torchtune's HF <-> torchtune key converters applied one tensor at a time.

torchtune's converters (``convert_weights.hf_to_tune``/``tune_to_hf``,
``qwen2_hf_to_tune``/``qwen2_tune_to_hf``) take a whole state dict, but every key and its
q/k RoPE permutation is converted independently; calling them on one-entry dicts converts
a 7B model without a second copy of it in memory.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torchtune.models import convert_weights
from torchtune.models.qwen2 import _convert_weights as qwen2_convert

from hmt_plugin.checkpointing.hf_config import read_hf_config
from hmt_plugin.checkpointing.io import ConversionError

COVERED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_ROTARY_BUFFER = "rotary_emb.inv_freq"


@dataclass(frozen=True)
class BackboneLayout:
    """Sizes of a decoder-only backbone as its ``config.json`` gives them.

    Args:
        model_type (str): HF ``model_type`` (``llama``, ``mistral`` or ``qwen2``).
        num_layers, num_heads, num_kv_heads, dim, head_dim, intermediate_dim, vocab_size:
            the architecture sizes.
        tie_word_embeddings (bool): the output projection reuses the token embeddings.
        qkv_bias (bool): q/k/v projections have biases (Qwen2).
        source (str): where the config came from, for error messages.
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dim: int
    head_dim: int
    intermediate_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    source: str = "config.json"

    @classmethod
    def from_hf_config(
        cls, config: Union[str, Path, Mapping[str, Any]], source: Optional[str] = None
    ) -> "BackboneLayout":
        """Read the sizes from ``config.json`` (a dict, the file or its directory); ``source``
        names it in error messages.

        Raises:
            ConversionError: an architecture these converters do not cover, or a missing field.
        """
        source = source or ("config.json" if isinstance(config, Mapping) else str(config))
        cfg = read_hf_config(config)
        kind = cfg.get("model_type")
        if kind not in COVERED_MODEL_TYPES:
            raise ConversionError(
                f"{source}: model_type={kind!r} is not covered (covered: "
                f"{', '.join(COVERED_MODEL_TYPES)}); the published HMT checkpoints of other "
                "backbones (OPT, ...) need their own key table."
            )
        if kind != "qwen2" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
            raise ConversionError(
                f"{source}: attention_bias/mlp_bias are set; torchtune's Llama converter has "
                "no bias keys, so this backbone is not covered."
            )
        try:
            heads = int(cfg["num_attention_heads"])
            dim = int(cfg["hidden_size"])
            return cls(
                model_type=kind,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                dim=dim,
                head_dim=int(cfg.get("head_dim") or dim // heads),
                intermediate_dim=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=kind == "qwen2",
                source=source,
            )
        except KeyError as err:
            raise ConversionError(f"{source} has no {err.args[0]!r}; it is not a complete config.json.") from err

    # ------------------------------------------------------------------ expected tensors
    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """HF key -> shape of every tensor this backbone has (``lm_head.weight`` only when
        the embeddings are not tied)."""
        d, hd, i = self.dim, self.head_dim, self.intermediate_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, d)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (i, d),
                p + "mlp.up_proj.weight": (i, d),
                p + "mlp.down_proj.weight": (d, i),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            })
            if self.qkv_bias:
                shapes.update({
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                })
        shapes["model.norm.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    def ordered(self, keys: Sequence[str]) -> List[str]:
        """``keys`` in the order of an HF ``state_dict()`` (embeddings, layers, norm, head),
        unknown ones last: safetensors files list their keys sorted by name."""
        rank = {k: i for i, k in enumerate(self.expected_shapes())}
        return sorted(keys, key=lambda k: (rank.get(k, len(rank)), k))

    def check(self, shapes: Mapping[str, Sequence[int]], where: str) -> None:
        """Raise :class:`ConversionError` naming the first key that does not fit.

        Args:
            shapes: HF key -> shape of the checkpoint's backbone tensors (RoPE ``inv_freq``
                buffers and, for tied embeddings, ``lm_head.weight`` are allowed extra).
            where: the checkpoint, for the message.
        """
        expected = self.expected_shapes()
        optional = {"lm_head.weight"} if self.tie_word_embeddings else set()
        present = [k for k in shapes if not k.endswith(_ROTARY_BUFFER) and k not in optional]
        unexpected = [k for k in present if k not in expected]
        missing = [k for k in expected if k not in shapes]
        if unexpected and len(unexpected) >= len(present) // 2:
            raise ConversionError(
                f"wrong architecture: {where} does not hold a {self.model_type} backbone of the "
                f"kind {self.source} describes; {len(unexpected)} of its {len(present)} backbone "
                f"tensors are not {self.model_type} tensors, e.g. {unexpected[0]!r}. Give the "
                "config.json of the backbone this checkpoint was trained from."
            )
        if unexpected:
            raise ConversionError(
                f"{where} has {unexpected[0]!r}" + _more(unexpected) + f", which a {self.model_type} "
                f"model with {self.source} does not have" + self._layer_hint(shapes) + "."
            )
        if missing:
            raise ConversionError(
                f"{where} lacks {missing[0]!r}" + _more(missing) + f", which {self.source} "
                f"({self.model_type}, {self.num_layers} layers) requires" + self._layer_hint(shapes) + "."
            )
        for key, want in expected.items():
            got = tuple(shapes[key])
            if got != want:
                raise ConversionError(
                    f"shape mismatch: {where} has {key!r} of shape {got}, but {self.source} "
                    f"(hidden_size={self.dim}, heads={self.num_heads}/{self.num_kv_heads}, "
                    f"intermediate_size={self.intermediate_dim}, vocab_size={self.vocab_size}) "
                    f"needs {want}; the checkpoint is of another model size."
                )
        if "lm_head.weight" in shapes and tuple(shapes["lm_head.weight"]) != (self.vocab_size, self.dim):
            raise ConversionError(
                f"shape mismatch: {where} has 'lm_head.weight' of shape "
                f"{tuple(shapes['lm_head.weight'])}, {self.source} needs {(self.vocab_size, self.dim)}."
            )

    def _layer_hint(self, shapes: Mapping[str, Any]) -> str:
        layers = {int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k))}
        if layers and len(layers) != self.num_layers:
            return (
                f" (the checkpoint has {len(layers)} layers, {self.source} says "
                f"num_hidden_layers={self.num_layers})"
            )
        return ""

    # ------------------------------------------------------------------ conversion
    def _hf_to_tune_dict(self, state_dict: Dict[str, torch.Tensor], dim: Optional[int] = None):
        if self.model_type == "qwen2":
            return qwen2_convert.qwen2_hf_to_tune(
                state_dict, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                dim=self.dim, head_dim=self.head_dim, tie_word_embeddings=self.tie_word_embeddings,
            )
        return convert_weights.hf_to_tune(
            state_dict, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            dim=dim or self.dim, head_dim=self.head_dim,
        )

    def hf_to_tune(self, key: str, tensor: torch.Tensor) -> Optional[Tuple[str, torch.Tensor]]:
        """One HF tensor -> (torchtune key, tensor) through torchtune's converter (q/k rows
        permuted for Llama/Mistral RoPE); None for tensors torchtune drops (``inv_freq``,
        Qwen2's tied ``lm_head``)."""
        out = self._hf_to_tune_dict({key: tensor})
        return next(iter(out.items()), None)

    def tune_to_hf(self, key: str, tensor: torch.Tensor) -> Tuple[str, torch.Tensor]:
        """One torchtune tensor -> (HF key, tensor), the inverse of :meth:`hf_to_tune`."""
        if self.model_type == "qwen2":
            out = qwen2_convert.qwen2_tune_to_hf(
                {key: tensor}, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                dim=self.dim, head_dim=self.head_dim, tie_word_embeddings=self.tie_word_embeddings,
            )
        else:
            out = convert_weights.tune_to_hf(
                {key: tensor}, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                dim=self.dim, head_dim=self.head_dim,
            )
        return next(iter(out.items()))

    def hf_key_to_tune(self, key: str) -> str:
        """Key name only (no tensor), e.g. for LoRA module names."""
        mapping = qwen2_convert._FROM_HF if self.model_type == "qwen2" else convert_weights._FROM_HF
        return convert_weights.get_mapped_key(key, mapping)

    def tune_key_to_hf(self, key: str) -> str:
        mapping = qwen2_convert._FROM_HF if self.model_type == "qwen2" else convert_weights._FROM_HF
        inverse = {v: k for k, v in mapping.items() if v is not None}
        return convert_weights.get_mapped_key(key, inverse)

    def permutes_rows(self, tune_module: str) -> bool:
        """Whether torchtune stores this projection's output rows permuted (q/k under Llama's
        RoPE layout); LoRA B matrices of such modules are permuted the same way."""
        return self.model_type != "qwen2" and tune_module.rsplit(".", 1)[-1] in ("q_proj", "k_proj")

    def lora_b_hf_to_tune(self, hf_base_key: str, lora_b: torch.Tensor) -> torch.Tensor:
        """HF-layout LoRA B ``[out, r]`` -> torchtune layout: torchtune's own q/k permutation,
        applied with ``dim`` set to the rank (the permutation only moves rows)."""
        out = self._hf_to_tune_dict({hf_base_key: lora_b}, dim=lora_b.shape[-1])
        return next(iter(out.values()))

    def lora_b_tune_to_hf(self, tune_lora_b_key: str, lora_b: torch.Tensor) -> torch.Tensor:
        """torchtune LoRA B -> HF/PEFT layout via torchtune's ``tune_to_peft_adapter_weights``."""
        if self.model_type == "qwen2":
            return lora_b
        out = convert_weights.tune_to_peft_adapter_weights(
            {tune_lora_b_key: lora_b}, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, dim=self.dim, head_dim=self.head_dim,
        )
        return next(iter(out.values()))


def _more(keys: List[str]) -> str:
    return f" (and {len(keys) - 1} more: {keys[1:4]})" if len(keys) > 1 else ""
