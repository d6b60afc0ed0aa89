"""Tiny Hugging Face checkpoint directories written by the tests: ``config.json`` and
``model.safetensors`` with the key names and shapes transformers uses for each architecture,
written from the config alone (not through our builder), so that loading them checks every
key against an independent layout."""

import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import save_file

# Dims NF4 can quantize (QLoRA): every frozen weight holds a multiple of 64 * 256 elements.
BASE = dict(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, torch_dtype="float32")

ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "llama_untied": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "llama_tied_gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                           num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3_scaled_rope": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], num_key_value_heads=2,
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3_scaled_rope_own_shape": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 2.0, "original_max_position_embeddings": 64}),
    "qwen2_tied_gqa": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                           num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                           rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=4096),
    "qwen2_untied": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                         rms_norm_eps=1e-6),
    "mistral_gqa": dict(model_type="mistral", architectures=["MistralForCausalLM"],
                        num_key_value_heads=2, sliding_window=128),
    "gemma": dict(model_type="gemma", architectures=["GemmaForCausalLM"], head_dim=32,
                  num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  hidden_activation="gelu_pytorch_tanh"),
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=32,
                   num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   sliding_window=64, query_pre_attn_scalar=32,
                   hidden_activation="gelu_pytorch_tanh"),
}


def hf_state_dict(cfg: Dict[str, Any], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights under transformers' key names for ``cfg``'s architecture."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    kind = cfg["model_type"]

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    def norm():  # Gemma stores RMSNorm weights as offsets from 1
        return rand(d) if kind.startswith("gemma") else 1 + rand(d)

    sd = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": norm()}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": rand(heads * hd, d),
            p + "self_attn.k_proj.weight": rand(kv * hd, d),
            p + "self_attn.v_proj.weight": rand(kv * hd, d),
            p + "self_attn.o_proj.weight": rand(d, heads * hd),
            p + "mlp.gate_proj.weight": rand(f, d),
            p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
        })
        if kind == "qwen2":
            for name, width in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                sd[p + f"self_attn.{name}_proj.bias"] = rand(width)
        if kind == "gemma2":
            sd[p + "pre_feedforward_layernorm.weight"] = norm()
            sd[p + "post_feedforward_layernorm.weight"] = norm()
    if not cfg.get("tie_word_embeddings", kind.startswith("gemma")):
        sd["lm_head.weight"] = rand(v, d)
    return sd


def write_hf_checkpoint(directory: Path, name: str, *, seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny ``ARCHITECTURES[name]`` model as an HF checkpoint directory."""
    cfg = {**BASE, **ARCHITECTURES[name], **overrides}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(cfg, seed), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory
