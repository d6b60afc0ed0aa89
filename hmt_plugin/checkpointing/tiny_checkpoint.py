"""A tiny randomly initialised Llama written as a Hugging Face checkpoint, for the CPU demo
and the tests: the same files a user downloads, read by the same torchtune checkpointer."""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3 import llama3
from torchtune.training import FullModelHFCheckpointer

TINY_LLAMA: Dict[str, Any] = dict(
    vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128
)


def write_tiny_hf_llama(
    directory: Path, *, seed: int = 0, max_seq_len: int = 512, rope_base: float = 10_000.0, **dims: Any
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face key names, converted by
    torchtune's ``tune_to_hf``) of a random Llama with ``dims`` (see ``TINY_LLAMA``)."""
    dims = {**TINY_LLAMA, **dims}
    directory = Path(directory)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        decoder = llama3(max_seq_len=max_seq_len, rope_base=rope_base, **dims)
    finally:
        torch.set_rng_state(generator_state)
    hf = tune_to_hf(
        decoder.state_dict(),
        num_heads=dims["num_heads"],
        num_kv_heads=dims["num_kv_heads"],
        dim=dims["embed_dim"],
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(directory / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": dims["vocab_size"],
        "hidden_size": dims["embed_dim"],
        "intermediate_size": dims["intermediate_dim"],
        "num_hidden_layers": dims["num_layers"],
        "num_attention_heads": dims["num_heads"],
        "num_key_value_heads": dims["num_kv_heads"],
        "head_dim": dims["embed_dim"] // dims["num_heads"],
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": 1e-5,
        "rope_theta": float(rope_base),
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def tiny_llama_checkpointer(
    checkpoint_dir: str,
    output_dir: str,
    *,
    checkpoint_files: Optional[List[str]] = None,
    seed: int = 0,
    max_seq_len: int = 512,
    **kwargs: Any,
) -> FullModelHFCheckpointer:
    """torchtune's ``FullModelHFCheckpointer`` (model type LLAMA3) on a tiny Llama.

    Without ``checkpoint_files``, reads ``<checkpoint_dir>/model.safetensors``, writing a random
    Llama there first (``TINY_LLAMA`` dims, overridable: ``vocab_size=``, ``embed_dim=``, ...) if
    it is not there yet: the demo config's backbone. With ``checkpoint_files`` (e.g. a recipe
    reloading a step checkpoint) it reads those files and writes nothing. Other keyword
    arguments go to the checkpointer."""
    dims = {k: kwargs.pop(k) for k in list(kwargs) if k in TINY_LLAMA}
    kwargs.pop("model_type", None)
    path = Path(checkpoint_dir)
    if checkpoint_files is None:
        checkpoint_files = ["model.safetensors"]
        if not (path / "model.safetensors").is_file():
            write_tiny_hf_llama(path, seed=seed, max_seq_len=max_seq_len, **dims)
    return FullModelHFCheckpointer(
        checkpoint_dir=str(path),
        checkpoint_files=list(checkpoint_files),
        model_type="LLAMA3",
        output_dir=output_dir,
        **kwargs,
    )
