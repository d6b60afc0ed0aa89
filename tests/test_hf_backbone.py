"""Any HF checkpoint directory as an HMT backbone from YAML: tiny checkpoints of each covered
architecture (written with transformers' key names by ``tests/hf_checkpoints.py``) build
through ``hmt_plugin.models.hf_backbone``, load strictly through torchtune's checkpointer
(``hmt_plugin.checkpointing.hf_checkpointer``) and run plain, with LoRA and with QLoRA."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import config
from torchtune.models.llama3_1 import Llama3ScaledRoPE
from torchtune.modules import TiedLinear
from torchtune.modules.peft import LoRALinear
from torchtune.training import FullModelHFCheckpointer

from hmt_plugin.checkpointing import decoder_from_hf_config, hf_checkpointer, hf_weight_files
from hmt_plugin.models import hf_backbone
from hmt_plugin.training.model_setup import (
    initial_state_dict,
    load_backbone,
    load_initial_state,
    lora_settings,
)
from tests.hf_checkpoints import ARCHITECTURES, hf_state_dict, write_hf_checkpoint

LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "lora_rank": 4}
VARIANTS = {"plain": {}, "lora": LORA, "qlora": {**LORA, "quantize_base": True}}


def _yaml_model(checkpoint_dir, **backbone):
    node = OmegaConf.create({
        "_component_": "hmt_plugin.models.hmt",
        "segment_length": 32,
        "num_sensory": 4,
        "backbone": {"_component_": "hmt_plugin.models.hf_backbone",
                     "checkpoint_dir": str(checkpoint_dir), **backbone},
    })
    return config.instantiate(node)


def _yaml_checkpointer(checkpoint_dir, output_dir):
    return config.instantiate(OmegaConf.create({
        "_component_": "hmt_plugin.checkpointing.hf_checkpointer",
        "checkpoint_dir": str(checkpoint_dir), "output_dir": str(output_dir)}))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_builds_from_yaml_loads_strictly_and_runs(tmp_path, name, variant):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", name, seed=1)
    model = _yaml_model(hf_dir, **VARIANTS[variant])
    checkpointer = _yaml_checkpointer(hf_dir, tmp_path / "out")
    assert isinstance(checkpointer, FullModelHFCheckpointer)
    base = load_backbone(checkpointer)
    # Every HF key became exactly one torchtune key of the built decoder, none left over.
    assert len(base) == len(hf_state_dict(json.loads((hf_dir / "config.json").read_text())))
    lora = lora_settings(model)
    assert (lora is None) == (variant == "plain")
    # The recipes' loader: raises on any missing or unexpected key.
    load_initial_state(model, initial_state_dict(model, base, lora=lora, seed=0), lora)
    if variant == "qlora":
        assert any(isinstance(p, NF4Tensor) for p in model.backbone.parameters())
    else:
        for key, value in base.items():
            assert torch.equal(model.backbone.state_dict()[key], value), key
    ids = torch.randint(0, 64, (2, 70))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.nll).all()
    out.nll.sum().backward()
    trained = [p for n, p in model.named_parameters() if "lora_" in n]
    assert (len(trained) > 0) == (variant != "plain")


@pytest.mark.parametrize("name", ["llama_tied_gqa", "qwen2_untied"])
def test_dora(tmp_path, name):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", name)
    model = _yaml_model(hf_dir, **LORA, use_dora=True)
    lora = lora_settings(model)
    assert lora["is_dora"]
    base = load_backbone(_yaml_checkpointer(hf_dir, tmp_path / "out"))
    load_initial_state(model, initial_state_dict(model, base, lora=lora, seed=0), lora)
    ids = torch.randint(0, 64, (2, 70))
    assert torch.isfinite(model(ids, labels=ids).nll).all()


def test_tied_and_untied_output(tmp_path):
    tied = decoder_from_hf_config(write_hf_checkpoint(tmp_path / "t", "llama_tied_gqa"))
    untied = decoder_from_hf_config(write_hf_checkpoint(tmp_path / "u", "llama_untied"))
    assert isinstance(tied.output, TiedLinear) and "output.weight" not in tied.state_dict()
    assert isinstance(untied.output, torch.nn.Linear) and "output.weight" in untied.state_dict()
    with pytest.raises(ValueError, match="apply_lora_to_output"):
        hf_backbone(tmp_path / "t", lora_attn_modules=["q_proj"], apply_lora_to_output=True)
    lora_out = hf_backbone(tmp_path / "u", lora_attn_modules=["q_proj"], apply_lora_to_output=True)
    assert isinstance(lora_out.output, LoRALinear)


def test_llama3_scaled_rope_is_torchtunes_with_the_configs_values(tmp_path):
    plain = decoder_from_hf_config(write_hf_checkpoint(tmp_path / "p", "llama_untied"))
    assert not isinstance(plain.layers[0].attn.pos_embeddings, Llama3ScaledRoPE)
    assert plain.layers[0].attn.pos_embeddings.base == 10000.0
    scaled = decoder_from_hf_config(write_hf_checkpoint(tmp_path / "s", "llama3_scaled_rope"))
    rope = scaled.layers[0].attn.pos_embeddings
    assert isinstance(rope, Llama3ScaledRoPE) and rope.scale_factor == 32.0
    assert (rope.base, rope.old_context_len) == (500000.0, 8192)
    own = decoder_from_hf_config(write_hf_checkpoint(tmp_path / "o", "llama3_scaled_rope_own_shape"))
    ropes = {id(layer.attn.pos_embeddings) for layer in own.layers}
    rope = own.layers[1].attn.pos_embeddings
    assert len(ropes) == 1 and (rope.scale_factor, rope.high_freq_factor, rope.old_context_len) == (4.0, 2.0, 64)
    assert not torch.equal(rope.cache, plain.layers[0].attn.pos_embeddings.cache)


def test_gqa_and_window_caps(tmp_path):
    decoder = decoder_from_hf_config(write_hf_checkpoint(tmp_path / "m", "mistral_gqa"))
    assert decoder.layers[0].attn.num_kv_heads == 2 and decoder.layers[0].attn.num_heads == 4
    assert decoder.max_seq_len == 128  # capped at the sliding window torchtune's mistral lacks
    with pytest.raises(ValueError, match="sliding_window=128"):
        decoder_from_hf_config(tmp_path / "m", max_seq_len=200)


def test_refusals_name_the_field(tmp_path):
    write_hf_checkpoint(tmp_path / "x", "llama_untied", model_type="phi3")
    with pytest.raises(ValueError, match=r"model_type='phi3' is not covered; covered: gemma, gemma2, llama, mistral, qwen2"):
        hf_backbone(tmp_path / "x")
    write_hf_checkpoint(tmp_path / "y", "llama_untied", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        hf_backbone(tmp_path / "y")
    write_hf_checkpoint(tmp_path / "z", "llama_untied")
    with pytest.raises(ValueError, match="quantize_base=true needs LoRA"):
        hf_backbone(tmp_path / "z", quantize_base=True)
    with pytest.raises(ValueError, match="has \\['q'\\]"):
        hf_backbone(tmp_path / "z", lora_attn_modules=["q"])
    with pytest.raises(ValueError, match="is empty; choose one or more"):
        hf_backbone(tmp_path / "z", lora_attn_modules=[])
    # SmolLM2's sizes: 576 x 576 projections are no multiple of NF4's 64 x 256 blocks.
    write_hf_checkpoint(tmp_path / "s", "llama_tied_gqa", hidden_size=576, num_attention_heads=9,
                        num_key_value_heads=3, intermediate_size=1536, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"attn.q_proj \(576, 576\)|attn.q_proj 576 x 576 = 331,776"):
        hf_backbone(tmp_path / "s", lora_attn_modules=["q_proj"], quantize_base=True)
    assert hf_backbone(tmp_path / "s", lora_attn_modules=["q_proj"]) is not None
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_backbone(tmp_path / "missing")


def test_checkpointer_defaults_follow_the_directory(tmp_path):
    hf_dir = write_hf_checkpoint(tmp_path / "q", "qwen2_tied_gqa")
    assert hf_weight_files(hf_dir) == ["model.safetensors"]
    assert hf_checkpointer(hf_dir, tmp_path / "o1")._model_type.name == "QWEN2"
    # A sharded download: the files its index names.
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00001.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    assert hf_weight_files(hf_dir) == ["model-00001-of-00001.safetensors"]
    assert len(hf_checkpointer(hf_dir, tmp_path / "o2").load_checkpoint()["model"]) > 0
    pattern = {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00001"}
    assert len(hf_checkpointer(hf_dir, tmp_path / "o4", checkpoint_files=pattern)
               .load_checkpoint()["model"]) > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        hf_checkpointer(empty, tmp_path / "o3")
