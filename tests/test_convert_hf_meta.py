"""``export-hf`` (LoRA merged, loadable by torchtune and transformers) and Meta's format
(``to-meta``/``from-meta``), on checkpoint directories written by torchtune's own HF
checkpointer, as training writes them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torchtune.models.llama3 import lora_llama3
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt
from torchtune.training.checkpointing import FullModelHFCheckpointer, FullModelMetaCheckpointer

from hmt_plugin.checkpointing import (
    ConversionError,
    convert_from_meta,
    convert_to_meta,
    decoder_from_hf_config,
    export_hf,
    save_hmt_checkpoint,
)
from hmt_plugin.checkpointing.meta import hf_config_from_meta, meta_params_from_hf, _meta_ffn_dim
from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.convert_cli import main
from hmt_plugin.checkpointing.io import ShardWriter, open_state_dict, parse_size
from hmt_plugin.modules import HMTConfig

from tests.test_convert_helpers import (
    HF_CONFIG,
    assert_same_tensors,
    load_with_torchtune,
    read_shards,
    write_hf_dir,
)

C = HF_CONFIG
HMT_SETTINGS = HMTConfig(segment_length=16, num_sensory=2, cache_size=3)


def _lora_model(rank=4, alpha=8.0):
    return lora_llama3(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        vocab_size=C["vocab_size"], num_layers=C["num_hidden_layers"], num_heads=C["num_attention_heads"],
        num_kv_heads=C["num_key_value_heads"], embed_dim=C["hidden_size"], max_seq_len=64,
        intermediate_dim=C["intermediate_size"], rope_base=C["rope_theta"], lora_rank=rank, lora_alpha=alpha,
    )


def _trained_dir(tmp_path: Path, *, lora: bool) -> dict:
    """What a run writes: torchtune's FullModelHFCheckpointer output (HF shards, index, config,
    copied tokenizer; with LoRA the adapter files) + our HMT files."""
    hf = tmp_path / "hf"
    original = write_hf_dir(hf)
    checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(hf), checkpoint_files=["model.safetensors"],
                                           model_type="LLAMA3", output_dir=str(tmp_path / "run"))
    base = checkpointer.load_checkpoint()["model"]
    state = {"model": dict(base)}
    lora_model = None
    if lora:
        lora_model = _lora_model()
        lora_model.load_state_dict(base, strict=False)
        for name, p in lora_model.named_parameters():
            if "lora_b" in name:  # lora_b starts at zero: make the merge matter
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
        state["adapter"] = get_adapter_state_dict(lora_model.state_dict())
        state["adapter_config"] = {"r": 4, "lora_alpha": 8.0, "peft_type": "LORA",
                                   "target_modules": ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]}
    checkpointer.save_checkpoint(state, epoch=0)
    ours = tmp_path / "run" / "epoch_0"
    hmt_sd = {"initial_memory": torch.randn(1, 32), "summary_token": torch.randn(1, 32),
              "recall.q_proj.weight": torch.randn(32, 32).bfloat16(), "recall.k_proj.weight": torch.randn(32, 32)}
    save_hmt_checkpoint(ours, hmt_sd, HMT_SETTINGS)
    return {"dir": ours, "hf": hf, "original": original, "base": base, "lora_model": lora_model}


# ----------------------------------------------------------------------------- export-hf
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path):
    run = _trained_dir(tmp_path, lora=False)
    out = tmp_path / "export"
    export_hf(run["dir"], out, show_progress=False)
    assert_same_tensors(run["original"], read_shards(out))
    assert (out / "config.json").read_bytes() == (run["hf"] / "config.json").read_bytes()
    for name in ("hmt_model.safetensors", "hmt_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (run["dir"] / name).read_bytes()


def test_export_hf_merges_lora_like_torchtune(tmp_path):
    run = _trained_dir(tmp_path, lora=True)
    out = tmp_path / "export"
    result = export_hf(run["dir"], out, max_shard_size=40_000, show_progress=False)
    assert any("merged" in n for n in result.notes)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not (out / "adapter_model.pt").exists() and not (out / "adapter_config.json").exists()
    # torchtune's HF checkpointer loads it, and it is torchtune's own merge, bit for bit.
    loaded = load_with_torchtune(out, tmp_path / "tt")
    expected = get_merged_lora_ckpt({k: v.clone() for k, v in run["lora_model"].state_dict().items()},
                                    rank=4, alpha=8.0)
    assert_same_tensors(expected, loaded)
    merged = decoder_from_hf_config(out)
    merged.load_state_dict(loaded)
    tokens = torch.randint(0, C["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tune_logits = merged(tokens)
        torch.testing.assert_close(run["lora_model"](tokens), tune_logits, atol=1e-5, rtol=0)

    # Only the PEFT-format adapter (adapter_model.safetensors): the same merge.
    (run["dir"] / "adapter_model.pt").unlink()
    export_hf(run["dir"], tmp_path / "export2", show_progress=False)
    assert_same_tensors(read_shards(out), read_shards(tmp_path / "export2"))

    transformers = pytest.importorskip("transformers")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    torch.testing.assert_close(hf_logits, tune_logits, atol=1e-5, rtol=0)


def test_export_hf_of_a_tied_qwen2(tmp_path):
    cfg = {**C, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}
    cfg.pop("head_dim")
    hf = tmp_path / "hf"
    original = write_hf_dir(hf, cfg)
    assert "lm_head.weight" not in original and "model.layers.0.self_attn.q_proj.bias" in original
    ours = tmp_path / "ours"
    shutil.copytree(hf, ours)  # an HF directory is one of ours without HMT files
    export_hf(ours, tmp_path / "out", show_progress=False)
    assert_same_tensors(original, read_shards(tmp_path / "out"))
    with pytest.raises(ConversionError, match="model_type='qwen2'"):
        convert_to_meta(ours, tmp_path / "meta", show_progress=False)


# ----------------------------------------------------------------------------- Meta
def test_ours_to_meta_to_ours_is_bit_identical(tmp_path):
    run = _trained_dir(tmp_path, lora=True)
    meta = tmp_path / "meta"
    convert_to_meta(run["dir"], meta, lora="keep", show_progress=False)
    assert {"consolidated.00.pth", "params.json", "config.json", "hmt_model.safetensors",
            "adapter_model.pt", "adapter_config.json"} <= {p.name for p in meta.iterdir()}
    # torchtune's Meta checkpointer reads it as the same torchtune state dict.
    checkpointer = FullModelMetaCheckpointer(checkpoint_dir=str(meta), checkpoint_files=["consolidated.00.pth"],
                                             model_type="LLAMA3", output_dir=str(tmp_path / "tt_meta"))
    assert_same_tensors(run["base"], checkpointer.load_checkpoint()["model"])
    back = tmp_path / "back"
    convert_from_meta(meta, back, max_shard_size="30KB", show_progress=False)
    assert_same_tensors(read_shards(run["dir"]), read_shards(back))
    for name in ("config.json", "hmt_model.safetensors", "hmt_config.json", "adapter_model.pt",
                 "adapter_config.json", "tokenizer.model"):
        assert (back / name).read_bytes() == (run["dir"] / name).read_bytes(), name
    assert not (back / "params.json").exists()


def test_to_meta_merges_lora(tmp_path):
    run = _trained_dir(tmp_path, lora=True)
    convert_to_meta(run["dir"], tmp_path / "meta", show_progress=False)
    assert not (tmp_path / "meta" / "adapter_model.pt").exists()
    meta_sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    expected = get_merged_lora_ckpt({k: v.clone() for k, v in run["lora_model"].state_dict().items()},
                                    rank=4, alpha=8.0)
    assert torch.equal(meta_sd["layers.1.attention.wq.weight"], expected["layers.1.attn.q_proj.weight"])


def test_from_meta_without_hf_config(tmp_path):
    run = _trained_dir(tmp_path, lora=False)
    meta = tmp_path / "meta"
    convert_to_meta(run["dir"], meta, show_progress=False)
    params = json.loads((meta / "params.json").read_text())
    assert _meta_ffn_dim(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == C["intermediate_size"]
    (meta / "config.json").unlink()
    back = tmp_path / "back"
    result = convert_from_meta(meta, back, max_seq_len=128, show_progress=False)
    assert any("derived" in n for n in result.notes)
    derived = json.loads((back / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "max_position_embeddings"):
        assert derived[key] == C[key], key
    assert_same_tensors(run["original"], read_shards(back))


@pytest.mark.parametrize("dim,hidden", [(4096, 11008), (4096, 14336), (64, 128), (2048, 8192), (32, 64)])
def test_meta_params_reproduce_the_ffn_width(dim, hidden):
    layout = BackboneLayout(model_type="llama", num_layers=1, num_heads=4, num_kv_heads=4, dim=dim,
                            head_dim=dim // 4, intermediate_dim=hidden, vocab_size=10)
    params = meta_params_from_hf({"rope_theta": 10000.0}, layout)
    assert _meta_ffn_dim(dim, params["multiple_of"], params["ffn_dim_multiplier"]) == hidden
    if (dim, hidden) == (4096, 11008):
        assert (params["multiple_of"], params["ffn_dim_multiplier"]) == (256, None)  # Llama 2 7B's own


def test_meta_bad_inputs(tmp_path):
    run = _trained_dir(tmp_path, lora=False)
    meta = tmp_path / "meta"
    convert_to_meta(run["dir"], meta, show_progress=False)
    sd = torch.load(meta / "consolidated.00.pth", weights_only=True)
    sd["layers.0.attention.wz.weight"] = torch.zeros(1)
    torch.save(sd, meta / "consolidated.00.pth")
    with pytest.raises(ConversionError, match=r"unexpected key 'layers\.0\.attention\.wz\.weight'"):
        convert_from_meta(meta, tmp_path / "o", show_progress=False)
    shutil.copy(meta / "consolidated.00.pth", meta / "consolidated.01.pth")
    with pytest.raises(ConversionError, match="model-parallel shards"):
        convert_from_meta(meta, tmp_path / "o", show_progress=False)
    with pytest.raises(ConversionError, match="use_scaled_rope"):
        hf_config_from_meta({"use_scaled_rope": True, "n_heads": 4, "n_layers": 2}, {}, torch.float32)


# ----------------------------------------------------------------------------- streaming pieces
def test_shard_writer_and_sizes(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five")
    writer = ShardWriter(tmp_path, max_shard_size=130)
    shared = torch.arange(10.0)
    tensors = {"a": shared, "b": shared, "c": torch.ones(30), "d": torch.zeros(2, dtype=torch.bfloat16)}
    for key, value in tensors.items():
        writer.add(key, value)  # tied tensors in one shard are stored twice, not refused
    weight_map = writer.close()
    assert len(set(weight_map.values())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    source = open_state_dict(tmp_path)
    assert source.dtype("d") == torch.bfloat16 and source.shape("c") == (30,)
    assert_same_tensors(tensors, {k: source.get(k) for k in source.keys()})


def test_cli_export_and_meta(tmp_path, capsys):
    run = _trained_dir(tmp_path, lora=True)
    assert main(["export-hf", str(run["dir"]), "-o", str(tmp_path / "e"), "-q"]) == 0
    assert main(["to-meta", str(run["dir"]), "-o", str(tmp_path / "m"), "--lora", "keep", "-q"]) == 0
    assert main(["from-meta", str(tmp_path / "m"), "-o", str(tmp_path / "b"), "--max-shard-size", "1MB", "-q"]) == 0
    assert_same_tensors(read_shards(run["dir"]), read_shards(tmp_path / "b"))
    capsys.readouterr()
    assert main(["export-hf", str(run["dir"]), "-o", str(tmp_path / "e"), "-q"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["export-hf", str(run["dir"]), "-o", str(tmp_path / "e"), "--overwrite", "-q"]) == 0
