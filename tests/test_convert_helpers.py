"""Tiny checkpoints for the conversion tests, built in the test (no shared files needed):
an HF Llama directory, published-format HMT state dicts (plain, ``module.``-prefixed, PEFT
LoRA, stage 1, bf16 recall) and torchtune LoRA adapters. No tests here."""

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.training.checkpointing import FullModelHFCheckpointer

from hmt_plugin.checkpointing import BackboneLayout, decoder_from_hf_config

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}
# HMT settings in the published code's names.
HPARAMS = {
    "segment_length": 16,
    "num_sensory": 2,
    "mem_recall_hidden_dim": 24,
    "mem_recall_context": 3,
    "bptt_depth": 2,
    "sum_fraction": 0.5,
}
D_H = HPARAMS["mem_recall_hidden_dim"]
# What the published main.py's --use_lora wraps (PEFT names).
PUBLISHED_LORA_TARGETS = ("embed_tokens", "gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


def hf_state_dict(config: Dict = HF_CONFIG, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random backbone weights under HF names (torchtune's ``tune_to_hf`` of a torchtune
    decoder built from ``config``)."""
    torch.manual_seed(seed)
    decoder = decoder_from_hf_config(config)
    for p in decoder.parameters():  # norms start at 1: make every tensor distinguishable
        p.data.normal_(0, 0.2)
    convert = qwen2_tune_to_hf if config["model_type"] == "qwen2" else tune_to_hf
    sd = convert(
        decoder.state_dict(), num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"], dim=config["hidden_size"],
    )
    # transformers' LlamaForCausalLM.state_dict() order (torchtune's differs in the MLP).
    return {k: sd[k] for k in BackboneLayout.from_hf_config(config).ordered(list(sd))}


def write_hf_dir(directory: Path, config: Dict = HF_CONFIG, seed: int = 0) -> Dict[str, torch.Tensor]:
    """An HF checkpoint directory (``config.json`` + ``model.safetensors``)."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(config, seed)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.model").write_bytes(b"not really a tokenizer")
    return sd


def write_config(directory: Path, config: Dict = HF_CONFIG) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def published_state_dict(
    *,
    stage: int = 2,
    prefix: str = "",
    recall_dtype: torch.dtype = torch.float32,
    lora_rank: Optional[int] = None,
    lora_targets=("q_proj", "v_proj"),
    seed: int = 0,
    config: Dict = HF_CONFIG,
) -> Dict[str, torch.Tensor]:
    """A ``RecurrentWrapper.state_dict()`` as the published code writes it (key order
    included): ``mem``, ``memory_cell.memory``, the backbone under ``memory_cell.model.``
    (PEFT-wrapped when ``lora_rank`` is set; ``embed_tokens`` in ``lora_targets`` wraps the
    embedding as the published ``--use_lora`` does), ``memory_cell.mem_map.*``, ``cross_attn.*``.
    Tied embeddings appear twice, as ``nn.Module.state_dict()`` lists them."""
    d = HF_CONFIG["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    out: Dict[str, torch.Tensor] = {}
    if stage == 2:
        out["mem"] = torch.randn(1, d, generator=g)
    out["memory_cell.memory"] = torch.randn(1, d, generator=g)
    backbone = "memory_cell.model." + ("base_model.model." if lora_rank else "")
    hf = hf_state_dict(config, seed=seed)
    if config.get("tie_word_embeddings"):
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    for key, value in hf.items():
        module, param = key.rsplit(".", 1)
        if lora_rank and module.rsplit(".", 1)[-1] == "embed_tokens" and "embed_tokens" in lora_targets:
            # PEFT's LoRA embedding: A [r, vocab] and B [dim, r], parameters without ".weight".
            out[f"{backbone}{module}.base_layer.{param}"] = value
            out[f"{backbone}{module}.lora_embedding_A.default"] = torch.randn(lora_rank, value.shape[0], generator=g) * 0.1
            out[f"{backbone}{module}.lora_embedding_B.default"] = torch.randn(value.shape[1], lora_rank, generator=g) * 0.1
        elif lora_rank and module.rsplit(".", 1)[-1] in lora_targets:
            out[f"{backbone}{module}.base_layer.{param}"] = value
            if param == "weight":
                out[f"{backbone}{module}.lora_A.default.weight"] = torch.randn(lora_rank, value.shape[1], generator=g) * 0.1
                out[f"{backbone}{module}.lora_B.default.weight"] = torch.randn(value.shape[0], lora_rank, generator=g) * 0.1
        else:
            out[backbone + key] = value
    out["memory_cell.mem_map.linear.weight"] = torch.randn(d, d, generator=g)
    out["memory_cell.mem_map.inv_linear.weight"] = torch.randn(d, d, generator=g)
    if stage == 2:
        out["cross_attn.wq.weight"] = torch.randn(D_H, d, generator=g).to(recall_dtype)
        out["cross_attn.wk.weight"] = torch.randn(D_H, d, generator=g).to(recall_dtype)
    return {prefix + k: v for k, v in out.items()}


def assert_same_tensors(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor]) -> None:
    """Every key, bit for bit, same dtype."""
    assert set(expected) == set(actual), set(expected) ^ set(actual)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def read_shards(directory: Path) -> Dict[str, torch.Tensor]:
    """All backbone tensors of an HF directory (every ``model*.safetensors``)."""
    out: Dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out


def load_with_torchtune(directory: Path, tmp: Path) -> Dict[str, torch.Tensor]:
    """The backbone as torchtune's ``FullModelHFCheckpointer`` loads it (torchtune keys)."""
    files = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(directory), checkpoint_files=sorted(set(files)),
        model_type="LLAMA3", output_dir=str(tmp),
    )
    return checkpointer.load_checkpoint()["model"]
