"""Every reference case of the published code, converted and loaded the way a user does it.

A case directory (see ``../shared/reference/README.md``) holds a published checkpoint
(``reference_hmt.pt``), its backbone's HF config, its settings (``case.json``) and the published
code's outputs (``golden.pt``). Each case here is converted with ``hmt-tune convert
from-reference`` (the CLI entry point, ``--hparams case.json``), in both ``--lora`` modes when
its backbone carries PEFT LoRA, and loaded through ``load_hmt_model`` (what ``hmt_eval`` and
``hmt_generate`` call: torchtune's HF checkpointer for the backbone, our HMT files, and the
kept adapter for a LoRA model). Logits, memories and summaries must match within 1e-4.

Cases: every directory with a ``case.json`` under ``../shared/reference`` and the ones named in
``HMT_REFERENCE_CASES`` (``os.pathsep``-separated) or ``HMT_REFERENCE_CASE``; none -> skipped.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from omegaconf import OmegaConf

from hmt_plugin.checkpointing import load_hmt_checkpoint
from hmt_plugin.checkpointing.convert_cli import main as convert_main
from hmt_plugin.checkpointing.hf_backbone import read_hf_config, rope_theta_of
from hmt_plugin.eval.model_loading import load_hmt_model

TOL = 1e-4
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"


def _cases() -> List[Path]:
    found = []
    for name in ("HMT_REFERENCE_CASES", "HMT_REFERENCE_CASE"):
        found += [Path(p) for p in os.environ.get(name, "").split(os.pathsep) if p]
    if _SHARED.is_dir():
        found += sorted(p.parent for p in _SHARED.glob("*/case.json"))
    unique = []
    for case in found:
        if case.resolve() not in [u.resolve() for u in unique]:
            unique.append(case)
    return unique


def _has_lora(case: Path) -> bool:
    keys = torch.load(case / "reference_hmt.pt", map_location="cpu", weights_only=True, mmap=True)
    return any(".lora_" in k for k in keys)


def _params() -> List[Any]:
    out = []
    for case in _cases():
        modes = ("merge", "keep") if _has_lora(case) else ("merge",)
        out += [pytest.param((case, mode), id=f"{case.name}-{mode}") for mode in modes]
    return out or [pytest.param((None, None), marks=pytest.mark.skip(reason="no reference case"))]


def _model_config(directory: Path, lora_mode: str) -> Dict[str, Any]:
    """The YAML ``model:`` node a user writes for the converted directory: the backbone's
    torchtune builder with its config.json's sizes, the HMT settings of ``hmt_config.json``."""
    cfg = read_hf_config(directory)
    assert cfg["model_type"] == "llama", "these cases are Llama backbones"
    backbone: Dict[str, Any] = {
        "_component_": "torchtune.models.llama3.llama3",
        "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg["num_key_value_heads"],
        "embed_dim": cfg["hidden_size"],
        "intermediate_dim": cfg["intermediate_size"],
        "max_seq_len": cfg["max_position_embeddings"],
        "norm_eps": cfg["rms_norm_eps"],
        "rope_base": rope_theta_of(cfg),
    }
    if lora_mode == "keep":
        adapter = json.loads((directory / "adapter_config.json").read_text())
        attn = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
        targets = adapter["target_modules"]
        backbone.update(
            _component_="torchtune.models.llama3.lora_llama3",
            lora_attn_modules=[ours for theirs, ours in attn.items() if theirs in targets],
            apply_lora_to_mlp=any(t in targets for t in ("gate_proj", "up_proj", "down_proj")),
            lora_rank=adapter["r"],
            lora_alpha=adapter["lora_alpha"],
        )
    _, hmt_config, _ = load_hmt_checkpoint(directory)
    return {"_component_": "hmt_plugin.models.hmt", "backbone": backbone, **hmt_config.to_dict()}


@pytest.fixture(scope="module", params=_params())
def converted(request, tmp_path_factory):
    case, lora_mode = request.param
    out = tmp_path_factory.mktemp("converted") / "ours"
    code = convert_main([
        "from-reference", str(case / "reference_hmt.pt"), "--hparams", str(case / "case.json"),
        "--hf_config", str(case / "hf_model" / "config.json"), "--lora", lora_mode, "-o", str(out), "-q",
    ])
    assert code == 0
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(out),
        "checkpoint_files": sorted(p.name for p in out.glob("model*.safetensors")),
        "model_type": "LLAMA3",
        "output_dir": str(tmp_path_factory.mktemp("tt_out")),
    }
    model = load_hmt_model(
        OmegaConf.create(_model_config(out, lora_mode)), OmegaConf.create(checkpointer), str(out),
        device=torch.device("cpu"), dtype=torch.float32, seed=0,
    )
    case_args = json.loads((case / "case.json").read_text())
    golden = torch.load(case / "golden.pt", weights_only=True)
    with torch.no_grad():
        result = model(golden["input_ids"], labels=golden["input_ids"], logits=int(case_args["num_seg_save"]))
    return case, lora_mode, out, model, golden, result


def test_logits_memories_summaries(converted):
    case, _, _, _, golden, result = converted
    assert result.logits.shape == golden["logits"].shape
    torch.testing.assert_close(result.logits, golden["logits"], atol=TOL, rtol=0)
    torch.testing.assert_close(result.memories, golden["memories"], atol=TOL, rtol=0)
    torch.testing.assert_close(result.summaries, golden["queries"], atol=TOL, rtol=0)


def test_last_segment_loss_and_recall(converted):
    case, _, _, model, golden, result = converted
    block = model.config.tokens_per_segment
    assert abs(result.nll[:, -block:].mean().item() - golden["loss"].item()) < TOL
    if "recall_argmax_distance" in golden:
        distance = result.recall_distance()[:, 1:].T.reshape(-1)
        assert distance.tolist() == golden["recall_argmax_distance"].tolist()


def test_converted_settings(converted):
    case, lora_mode, out, model, _, _ = converted
    args = json.loads((case / "case.json").read_text())
    original = torch.load(case / "reference_hmt.pt", map_location="cpu", weights_only=True, mmap=True)
    stored = next(v.dtype for k, v in original.items() if k.endswith("cross_attn.wq.weight"))
    stock = bool(args.get("stock_recall")) or stored == torch.bfloat16
    assert model.config.recall_dtype == ("bfloat16" if stock else None)
    assert model.config.tokens_per_segment == args["block_size"]
    if lora_mode == "keep":
        assert (out / "adapter_model.pt").is_file()


def test_back_to_the_published_layout(converted, tmp_path):
    """to-reference gives the published file back, bit for bit (a kept embedding adapter
    included); from a merged conversion, a plain state dict without LoRA keys."""
    case, lora_mode, out, _, _, _ = converted
    back_path = tmp_path / "back.pt"
    assert convert_main(["to-reference", str(out), "-o", str(back_path), "-q"]) == 0
    back = torch.load(back_path, weights_only=True)
    original = torch.load(case / "reference_hmt.pt", weights_only=True)
    lora = any(".lora_" in k for k in original)
    if lora_mode == "keep" or not lora:
        assert list(back) == list(original)
        for key, value in original.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    else:
        assert not any(".lora_" in k or ".base_layer." in k for k in back)
