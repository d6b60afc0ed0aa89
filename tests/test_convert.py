"""``from-reference`` / ``to-reference``: the published HMT code's checkpoints <-> our
checkpoint directories. Round trips are bit-identical; bad inputs fail naming the key/file."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import hf_to_tune
from torchtune.models.llama3 import lora_llama3

from hmt_plugin.checkpointing import (
    ConversionError,
    checkpointer_model_type,
    convert_from_reference,
    convert_to_reference,
    decoder_from_hf_config,
    load_hmt_checkpoint,
    load_hmt_into,
)
from hmt_plugin.checkpointing.convert_cli import main
from hmt_plugin.modules import HMT, HMTConfig

from tests.test_convert_helpers import (
    HF_CONFIG,
    HPARAMS,
    PUBLISHED_LORA_TARGETS,
    assert_same_tensors,
    load_with_torchtune,
    published_state_dict,
    read_shards,
    write_config,
)


@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path / "hf")


def _save(sd, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save(sd, path)
    return path


def _from_ref(tmp_path, sd, config_path, name="ckpt.pt", **kwargs):
    source = _save(sd, tmp_path / name)
    out = tmp_path / "ours"
    result = convert_from_reference(source, out, hf_config=config_path, hparams=HPARAMS,
                                    show_progress=False, **kwargs)
    return out, result


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "variant",
    ["plain", "module_prefix", "bf16_recall", "stage1", "peft_kept", "published_use_lora_kept",
     "safetensors", "deepspeed_fp32"],
)
def test_reference_round_trip_is_bit_identical(tmp_path, config_path, variant):
    kwargs, name = {}, "ckpt.pt"
    sd_args = {}
    if variant == "module_prefix":
        sd_args["prefix"] = "module."
    elif variant == "bf16_recall":
        sd_args["recall_dtype"] = torch.bfloat16
    elif variant == "stage1":
        sd_args["stage"] = 1
    elif variant == "peft_kept":
        sd_args["lora_rank"] = 4
        kwargs["lora"] = "keep"
    elif variant == "published_use_lora_kept":
        # The published --use_lora: embedding and every linear wrapped, r 8, alpha 32.
        sd_args.update(lora_rank=8, lora_targets=PUBLISHED_LORA_TARGETS, prefix="module.")
        kwargs["lora"] = "keep"
    elif variant == "safetensors":
        name = "ckpt.safetensors"
    elif variant == "deepspeed_fp32":
        # zero_to_fp32.py output: a plain fp32 state dict, here under DDP's module. prefix.
        sd_args["prefix"] = "module."
        name = "pytorch_model.bin"
    original = published_state_dict(**sd_args)
    out, _ = _from_ref(tmp_path, original, config_path, name=name, **kwargs)
    convert_to_reference(out, tmp_path / "back.pt", show_progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert_same_tensors(original, back)
    if variant != "safetensors":  # (safetensors files keep no key order)
        assert list(back) == list(original)  # the published state-dict order, too


def test_round_trip_of_a_tied_qwen2_with_peft_biases(tmp_path):
    """Qwen2: q/k/v biases (PEFT's ``base_layer.bias``), no q/k permutation, a tied head that
    ``state_dict()`` lists twice and HF files omit."""
    cfg = {**HF_CONFIG, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}
    original = published_state_dict(lora_rank=4, config=cfg)
    assert "memory_cell.model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in original
    out, _ = _from_ref(tmp_path, original, write_config(tmp_path / "qwen", cfg), lora="keep")
    assert "lm_head.weight" not in read_shards(out)
    convert_to_reference(out, tmp_path / "back.pt", show_progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert_same_tensors(original, back)
    assert list(back) == list(original)


def test_from_reference_layout(tmp_path, config_path):
    original = published_state_dict(recall_dtype=torch.bfloat16)
    out, result = _from_ref(tmp_path, original, config_path)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "hmt_config.json", "hmt_model.safetensors",
                     "model-00001-of-00001.safetensors", "model.safetensors.index.json",
                     "published_extras.safetensors"]
    assert (out / "config.json").read_bytes() == config_path.read_bytes()
    sd, config, meta = load_hmt_checkpoint(out)
    # bf16 recall weights: the stock published code's, so its recall precision too.
    assert config == HMTConfig(segment_length=16, num_sensory=2, recall_hidden_dim=24, cache_size=3,
                               bptt_depth=2, mode="hmt", score_scale="published", recall_dtype="bfloat16",
                               memory_init="published")
    assert any("recall_dtype: bfloat16" in n for n in result.notes)
    assert sd["recall.q_proj.weight"].dtype == torch.bfloat16  # kept as written
    assert torch.equal(sd["summary_token"], original["mem"])
    assert meta["published"]["extras"] == "published_extras.safetensors"
    # Backbone tensors unchanged, under HF names.
    shards = read_shards(out)
    for key, value in shards.items():
        assert torch.equal(value, original["memory_cell.model." + key])
    # The model loads it: backbone via torchtune's checkpointer, HMT via load_hmt_into (bf16 cast).
    decoder = decoder_from_hf_config(out)
    decoder.load_state_dict(load_with_torchtune(out, tmp_path / "tt"))
    model = HMT(decoder, config)
    load_hmt_into(model, out)
    assert model.recall.q_proj.weight.dtype == torch.float32
    assert torch.equal(model.recall.q_proj.weight, original["cross_attn.wq.weight"].float())


def test_stage1_checkpoint_becomes_stage1_mode(tmp_path, config_path):
    out, result = _from_ref(tmp_path, published_state_dict(stage=1), config_path)
    sd, config, _ = load_hmt_checkpoint(out)
    assert config.mode == "hmt_stage1" and set(sd) == {"initial_memory"}
    assert any("stage-1" in n for n in result.notes)
    # ... and loads into a stage-2 model (recall weights keep their initialisation).
    model = HMT(decoder_from_hf_config(out), config.with_mode("hmt"))
    load_hmt_into(model, out)


def test_published_defaults_fill_missing_settings(tmp_path, config_path):
    source = _save(published_state_dict(), tmp_path / "c.pt")
    result = convert_from_reference(source, tmp_path / "o", hf_config=config_path,
                                    hparams={"segment_length": 16}, show_progress=False)
    _, config, _ = load_hmt_checkpoint(tmp_path / "o")
    # The published main.py's defaults, not ours (num_sensory 0, cache 100), d_h from the tensors.
    assert (config.num_sensory, config.cache_size, config.recall_hidden_dim) == (0, 100, 24)
    assert any("defaults" in n for n in result.notes)


# ----------------------------------------------------------------------------- LoRA
def _merged(original, rank, alpha=32.0):
    """W + alpha/r * B @ A in HF layout, computed here by hand."""
    prefix = "memory_cell.model.base_model.model."
    out = {}
    for key, value in original.items():
        if not key.startswith(prefix) or ".lora_" in key:
            continue
        hf_key = key[len(prefix):].replace(".base_layer.", ".")
        module = key[: -len(".base_layer.weight")] if ".base_layer." in key else None
        if module and f"{module}.lora_A.default.weight" in original:
            a, b = original[f"{module}.lora_A.default.weight"], original[f"{module}.lora_B.default.weight"]
            value = value + (alpha / rank) * b @ a
        out[hf_key] = value
    return out


def test_peft_lora_merged(tmp_path, config_path):
    original = published_state_dict(lora_rank=4)
    out, result = _from_ref(tmp_path, original, config_path, lora="merge", lora_alpha=16.0)
    expected = _merged(original, rank=4, alpha=16.0)
    shards = read_shards(out)
    assert set(shards) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(shards[key], value, atol=1e-6, rtol=0)
    assert not (out / "adapter_model.pt").exists()
    # Merged weights go back as a plain (un-wrapped) published state dict.
    convert_to_reference(out, tmp_path / "back.pt", show_progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert "memory_cell.model.model.layers.0.self_attn.q_proj.weight" in back
    assert not any("lora" in k for k in back)


def test_peft_lora_kept_as_torchtune_adapter(tmp_path, config_path):
    """The kept adapter uses torchtune's keys and q/k layout: a torchtune LoRA model with the
    base weights and adapter_model.pt computes what the merged backbone computes."""
    original = published_state_dict(lora_rank=4, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))
    out, _ = _from_ref(tmp_path, original, config_path, lora="keep")
    adapter = torch.load(out / "adapter_model.pt", weights_only=True)
    assert "layers.0.attn.q_proj.lora_a.weight" in adapter and "layers.1.mlp.w1.lora_b.weight" in adapter
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 32.0
    assert sorted(adapter_config["target_modules"]) == ["gate_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    peft = load_file(str(out / "adapter_model.safetensors"))
    assert torch.equal(peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       original["memory_cell.model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"])

    c = HF_CONFIG
    lora_model = lora_llama3(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], embed_dim=c["hidden_size"], max_seq_len=64,
        intermediate_dim=c["intermediate_size"], rope_base=c["rope_theta"], lora_rank=4, lora_alpha=32.0,
    )
    base = load_with_torchtune(out, tmp_path / "tt")
    state = {**base, **adapter}
    # gate_proj only carries LoRA: zero the adapters of w2/w3 that lora_llama3 adds anyway.
    for key, value in lora_model.state_dict().items():
        if key not in state:
            state[key] = torch.zeros_like(value)
    lora_model.load_state_dict(state)
    merged = decoder_from_hf_config(c)
    merged.load_state_dict(hf_to_tune(_merged(original, rank=4), num_heads=4, num_kv_heads=2, dim=32))
    tokens = torch.randint(0, c["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lora_model(tokens), merged(tokens), atol=1e-5, rtol=0)


def _merged_embedding(original, rank, alpha):
    """The published embedding LoRA merged by hand: W + alpha/r * (B @ A)^T."""
    prefix = "memory_cell.model.base_model.model.model.embed_tokens."
    base = original[prefix + "base_layer.weight"]
    a, b = original[prefix + "lora_embedding_A.default"], original[prefix + "lora_embedding_B.default"]
    return base + (alpha / rank) * (b @ a).T


@pytest.mark.parametrize("mode", ["merge", "keep"])
def test_published_use_lora_with_embedding(tmp_path, config_path, mode):
    """The published --use_lora checkpoint (embed_tokens and every linear, r 8, alpha 32 by
    default): merged, or linear adapters kept and the embedding merged (a note says so); the
    model built from the result computes what the merged weights compute."""
    original = published_state_dict(lora_rank=8, lora_targets=PUBLISHED_LORA_TARGETS)
    out, result = _from_ref(tmp_path, original, config_path, lora=mode)
    shards = read_shards(out)
    torch.testing.assert_close(shards["model.embed_tokens.weight"], _merged_embedding(original, 8, 32.0),
                               atol=1e-6, rtol=0)
    assert any("embedding LoRA" in n and "merged" in n for n in result.notes)
    expected = _merged(original, rank=8)
    expected["model.embed_tokens.weight"] = _merged_embedding(original, 8, 32.0)
    reference = decoder_from_hf_config(HF_CONFIG)
    reference.load_state_dict(hf_to_tune(expected, num_heads=4, num_kv_heads=2, dim=32))
    if mode == "merge":
        for key, value in expected.items():
            torch.testing.assert_close(shards[key], value, atol=1e-6, rtol=0)
        decoder = decoder_from_hf_config(HF_CONFIG)
        decoder.load_state_dict(load_with_torchtune(out, tmp_path / "tt"))
    else:
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 32.0
        assert sorted(adapter_config["target_modules"]) == sorted(set(PUBLISHED_LORA_TARGETS) - {"embed_tokens"})
        assert any("torchtune has no LoRA embedding" in n for n in result.notes)
        c = HF_CONFIG
        decoder = lora_llama3(
            ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
            vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"], embed_dim=c["hidden_size"], max_seq_len=64,
            intermediate_dim=c["intermediate_size"], rope_base=c["rope_theta"], lora_rank=8, lora_alpha=32.0,
        )
        adapter = torch.load(out / "adapter_model.pt", weights_only=True)
        decoder.load_state_dict({**load_with_torchtune(out, tmp_path / "tt"), **adapter})
    tokens = torch.randint(0, HF_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), reference(tokens), atol=1e-5, rtol=0)
    # Back to the published layout: bit for bit when kept, merged and plain otherwise.
    convert_to_reference(out, tmp_path / "back.pt", show_progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    if mode == "keep":
        assert list(back) == list(original)
        assert_same_tensors(original, back)
    else:
        assert not any("lora" in k for k in back)


def test_changed_embedding_goes_back_with_a_zero_embedding_adapter(tmp_path, config_path):
    original = published_state_dict(lora_rank=4, lora_targets=("embed_tokens", "q_proj"))
    out, _ = _from_ref(tmp_path, original, config_path, lora="keep")
    # Someone edits the (merged) embedding after the conversion.
    shard = next(out.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = convert_to_reference(out, tmp_path / "back.pt", show_progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    prefix = "memory_cell.model.base_model.model.model.embed_tokens."
    assert torch.equal(back[prefix + "base_layer.weight"], tensors["model.embed_tokens.weight"])
    assert not back[prefix + "lora_embedding_B.default"].any()
    assert any("changed since the conversion" in n for n in result.notes)


def test_lora_alpha_and_rank_from_the_settings(tmp_path, config_path):
    original = published_state_dict(lora_rank=4, lora_targets=("embed_tokens", "q_proj"))
    source = _save(original, tmp_path / "ckpt.pt")
    convert_from_reference(source, tmp_path / "a", hf_config=config_path, show_progress=False,
                           hparams={**HPARAMS, "lora": {"r": 4, "alpha": 8}})
    expected = _merged_embedding(original, 4, 8.0)
    torch.testing.assert_close(read_shards(tmp_path / "a")["model.embed_tokens.weight"], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="lora_rank=8 was given"):
        convert_from_reference(source, tmp_path / "b", hf_config=config_path, show_progress=False,
                               hparams={**HPARAMS, "lora": {"r": 8, "alpha": 8}})


@pytest.mark.parametrize("choice, expected", [("auto", "bfloat16"), ("model", None), ("float32", "float32")])
def test_recall_dtype_choice(tmp_path, config_path, choice, expected):
    out, _ = _from_ref(tmp_path, published_state_dict(recall_dtype=torch.bfloat16), config_path,
                       recall_dtype=choice)
    assert load_hmt_checkpoint(out)[1].recall_dtype == expected


def test_fp32_recall_weights_keep_the_model_dtype_unless_stated(tmp_path, config_path):
    source = _save(published_state_dict(), tmp_path / "ckpt.pt")
    result = convert_from_reference(source, tmp_path / "a", hf_config=config_path, hparams=HPARAMS,
                                    show_progress=False)
    assert load_hmt_checkpoint(tmp_path / "a")[1].recall_dtype is None
    assert any("--recall_dtype bfloat16" in n for n in result.notes)
    convert_from_reference(source, tmp_path / "b", hf_config=config_path, show_progress=False,
                           hparams={**HPARAMS, "stock_recall": True})
    assert load_hmt_checkpoint(tmp_path / "b")[1].recall_dtype == "bfloat16"


@pytest.mark.parametrize("flag, mode, new_tokens", [("rmt_only", "rmt", 16 - 2 - 2), ("baseline_only", "baseline", 16 - 2)])
def test_rmt_and_baseline_runs_keep_the_published_segment(tmp_path, config_path, flag, mode, new_tokens):
    """The published code reads segment_length - 2*memory - num_sensory new tokens in every
    mode (memory 0 for the baseline); the converted config reads as many, and goes back to
    the published segment_length."""
    original = {k: v for k, v in published_state_dict(stage=1).items()
                if mode != "baseline" or k != "memory_cell.memory"}
    source = _save(original, tmp_path / "ckpt.pt")
    convert_from_reference(source, tmp_path / "ours", hf_config=config_path, hparams={**HPARAMS, flag: True},
                           show_progress=False)
    config = load_hmt_checkpoint(tmp_path / "ours")[1]
    assert (config.mode, config.tokens_per_segment) == (mode, new_tokens)
    convert_to_reference(tmp_path / "ours", tmp_path / "back.pt", show_progress=False)
    hparams = json.loads((tmp_path / "back.hparams.json").read_text())
    assert hparams["segment_length"] == HPARAMS["segment_length"] and hparams[flag] is True


# ----------------------------------------------------------------------------- to-reference of our own runs
def test_to_reference_of_a_model_trained_here(tmp_path, config_path):
    """A directory without published extras: mem_map becomes identity (and a note says so);
    the result loads into the published wrapper's key set."""
    original = published_state_dict()
    out, _ = _from_ref(tmp_path, original, config_path)
    (out / "published_extras.safetensors").unlink()
    result = convert_to_reference(out, tmp_path / "ref.pt", show_progress=False)
    back = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert set(back) == set(original)
    assert torch.equal(back["memory_cell.mem_map.linear.weight"], torch.eye(32))
    assert any("identity" in n for n in result.notes)
    hparams = json.loads((tmp_path / "ref.hparams.json").read_text())
    assert hparams["segment_length"] == 16 and hparams["mem_recall_hidden_dim"] == 24
    # The settings file carries the backbone config: it alone suffices to convert back.
    convert_from_reference(tmp_path / "ref.pt", tmp_path / "again", hparams=tmp_path / "ref.hparams.json",
                           show_progress=False)
    assert load_hmt_checkpoint(tmp_path / "again")[1] == load_hmt_checkpoint(out)[1]


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("setting,value,param,match", [
    ("memory_scale", "embedding", ("memory_norm", (1,)), "memory_scale='embedding'"),
    ("memory_sink", True, ("sink", (1, 32)), "memory_sink=True"),
])
def test_options_beyond_the_published_function_do_not_go_to_its_format(
        tmp_path, config_path, setting, value, param, match):
    """The published code writes the final-norm hidden state as it is and reads
    [P_n; sensory; x_n; P_n]: a model trained with a rescaled memory or a sink would be read
    differently there, so it is refused, naming the setting."""
    from hmt_plugin.checkpointing import save_hmt_checkpoint

    out, _ = _from_ref(tmp_path, published_state_dict(), config_path)
    hmt_sd, config, meta = load_hmt_checkpoint(out)
    changed = HMTConfig(**{**config.to_dict(), setting: value})
    save_hmt_checkpoint(out, {**hmt_sd, param[0]: torch.ones(param[1])}, changed,
                        extra={k: v for k, v in meta.items() if k not in ("format", "hmt")})
    with pytest.raises(ConversionError, match=f"{match}.*published code cannot"):
        convert_to_reference(out, tmp_path / "ref.pt", show_progress=False)
    assert not (tmp_path / "ref.pt").exists()


def test_wrong_architecture(tmp_path, config_path):
    sd = published_state_dict()
    opt_like = {k.replace("model.layers.", "model.decoder.layers."): v for k, v in sd.items()}
    with pytest.raises(ConversionError, match=r"wrong architecture.*model\.decoder\.layers\.0"):
        _from_ref(tmp_path, opt_like, config_path)


def test_config_of_uncovered_architecture(tmp_path):
    path = write_config(tmp_path / "opt", {**HF_CONFIG, "model_type": "opt"})
    with pytest.raises(ConversionError, match="model_type='opt'"):
        _from_ref(tmp_path, published_state_dict(), path)


def test_missing_key_is_named(tmp_path, config_path):
    sd = published_state_dict()
    del sd["memory_cell.model.model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ConversionError, match=r"lacks 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        _from_ref(tmp_path, sd, config_path)
    sd = published_state_dict()
    del sd["memory_cell.memory"]
    with pytest.raises(ConversionError, match="missing key 'memory_cell.memory'"):
        _from_ref(tmp_path, sd, config_path)


def test_shape_mismatch_is_named(tmp_path, config_path):
    sd = published_state_dict()
    sd["memory_cell.model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    with pytest.raises(ConversionError, match=r"shape mismatch.*'model\.layers\.0\.mlp\.up_proj\.weight' of shape \(48, 32\)"):
        _from_ref(tmp_path, sd, config_path)
    # A config of another size: the first tensor that does not fit is named.
    bigger = write_config(tmp_path / "big", {**HF_CONFIG, "hidden_size": 48})
    with pytest.raises(ConversionError, match=r"shape mismatch.*'model\.embed_tokens\.weight'"):
        _from_ref(tmp_path, published_state_dict(), bigger)


def test_layer_count_mismatch(tmp_path):
    path = write_config(tmp_path / "c", {**HF_CONFIG, "num_hidden_layers": 3})
    with pytest.raises(ConversionError, match="the checkpoint has 2 layers.*num_hidden_layers=3"):
        _from_ref(tmp_path, published_state_dict(), path)


def test_recall_settings_must_fit_the_tensors(tmp_path, config_path):
    source = _save(published_state_dict(), tmp_path / "c.pt")
    with pytest.raises(ConversionError, match=r"'cross_attn\.wq\.weight'.*mem_recall_hidden_dim=4096"):
        convert_from_reference(source, tmp_path / "o", hf_config=config_path,
                               hparams={**HPARAMS, "mem_recall_hidden_dim": 4096}, show_progress=False)
    with pytest.raises(ConversionError, match=r"cross_attn\.wq\.weight.*--hmt_stage_1"):
        convert_from_reference(source, tmp_path / "o", hf_config=config_path,
                               hparams={**HPARAMS, "hmt_stage_1": True}, show_progress=False)


def test_unexpected_key_is_named(tmp_path, config_path):
    sd = published_state_dict()
    sd["optimizer.step"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="unexpected key 'optimizer.step'"):
        _from_ref(tmp_path, sd, config_path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_named(tmp_path, config_path, suffix):
    path = _save(published_state_dict(), tmp_path / f"ckpt{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=rf"{path.name}.*(truncated|damaged)"):
        convert_from_reference(path, tmp_path / "o", hf_config=config_path, hparams=HPARAMS,
                               show_progress=False)
    assert not (tmp_path / "o").exists()


def test_unconsolidated_deepspeed_checkpoint(tmp_path, config_path):
    ds = tmp_path / "ds"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    torch.save({"module": None}, ds / "global_step10" / "mp_rank_00_model_states.pt")
    for source in (ds, ds / "global_step10" / "mp_rank_00_model_states.pt"):
        with pytest.raises(ConversionError, match="zero_to_fp32"):
            convert_from_reference(source, tmp_path / "o", hf_config=config_path, hparams=HPARAMS,
                                   show_progress=False)


def test_missing_config_and_existing_output(tmp_path, config_path):
    source = _save(published_state_dict(), tmp_path / "c.pt")
    with pytest.raises(ConversionError, match="config.json"):
        convert_from_reference(source, tmp_path / "o", hparams=HPARAMS, show_progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert_from_reference(source, tmp_path / "full", hf_config=config_path, hparams=HPARAMS,
                               show_progress=False)


def test_damaged_shard_of_our_directory(tmp_path, config_path):
    out, _ = _from_ref(tmp_path, published_state_dict(), config_path)
    shard = out / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConversionError, match="model-00001-of-00001.safetensors.*truncated"):
        convert_to_reference(out, tmp_path / "r.pt", show_progress=False)


# ----------------------------------------------------------------------------- CLI
def test_cli_round_trip_and_errors(tmp_path, config_path, capsys):
    source = _save(published_state_dict(prefix="module."), tmp_path / "c.pt")
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({**HPARAMS, "num_sensory": 8}))
    out = tmp_path / "ours"
    # Flags override the JSON, both spellings work.
    rc = main(["from-reference", str(source), "--hf_config", str(config_path), "--hparams", str(hparams),
               "--num-sensory", "2", "-o", str(out), "-q"])
    assert rc == 0
    assert load_hmt_checkpoint(out)[1].num_sensory == 2
    assert main(["to-reference", str(out), "-o", str(tmp_path / "r.pt"), "-q"]) == 0
    assert_same_tensors(torch.load(source, weights_only=True), torch.load(tmp_path / "r.pt", weights_only=True))
    capsys.readouterr()
    rc = main(["from-reference", str(tmp_path / "nope.pt"), "--hf_config", str(config_path), "-o", str(tmp_path / "x")])
    assert rc == 1 and "nope.pt does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the reference case
def _case_dir():
    env = os.environ.get("HMT_REFERENCE_CASE")
    if env:
        return Path(env)
    default = Path(__file__).resolve().parents[2] / "shared" / "reference" / "case_a"
    return default if default.is_dir() else None


CASE = _case_dir()


@pytest.mark.skipif(CASE is None, reason="no reference case (set HMT_REFERENCE_CASE)")
def test_converted_reference_gives_reference_logits(tmp_path):
    case = json.loads((CASE / "case.json").read_text())
    out = tmp_path / "ours"
    convert_from_reference(CASE / "reference_hmt.pt", out, hf_config=CASE / "hf_model" / "config.json",
                           hparams=CASE / "case.json", show_progress=False)
    _, config, _ = load_hmt_checkpoint(out)
    decoder = decoder_from_hf_config(out)
    assert checkpointer_model_type(out) == "LLAMA3"
    decoder.load_state_dict(load_with_torchtune(out, tmp_path / "tt"))
    model = HMT(decoder, config)
    load_hmt_into(model, out)
    golden = torch.load(CASE / "golden.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        result = model(golden["input_ids"], labels=golden["input_ids"], logits=int(case["num_seg_save"]))
    torch.testing.assert_close(result.logits, golden["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(result.memories, golden["memories"], atol=1e-4, rtol=0)
    # ... and back, bit for bit.
    convert_to_reference(out, tmp_path / "back.pt", show_progress=False)
    assert_same_tensors(torch.load(CASE / "reference_hmt.pt", weights_only=True),
                        torch.load(tmp_path / "back.pt", weights_only=True))
