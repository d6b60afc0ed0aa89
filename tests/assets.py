"""Tiny real assets built inside the tests: an HF-format Llama checkpoint written from a
torchtune model through torchtune's own converter, and a SentencePiece tokenizer trained
on text the test writes."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3 import llama3

TINY_LLAMA = dict(
    vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128
)

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
    "a single step. All happy families are alike; each unhappy family is unhappy in its own "
    "way. It was the best of times, it was the worst of times. Call me Ishmael. "
)


def write_hf_llama(directory: Path, *, seed: int = 0, max_seq_len: int = 512, **dims) -> Path:
    """A random tiny Llama saved the way ``save_pretrained`` lays it out: ``config.json``
    and ``model.safetensors`` with Hugging Face key names."""
    dims = {**TINY_LLAMA, **dims}
    torch.manual_seed(seed)
    decoder = llama3(max_seq_len=max_seq_len, rope_base=10_000, **dims)
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
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_sentencepiece(directory: Path, vocab_size: int = 256) -> Path:
    """A SentencePiece BPE model in the Llama 2 layout (unk 0, bos 1, eos 2, no pad id)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(TEXT.split(". ")) * 20)
    prefix = directory / "tok"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")
