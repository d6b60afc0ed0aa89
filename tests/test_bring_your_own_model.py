"""The shipped smollm2_135m configs end to end: stage 1 (LoRA) -> stage 2 from stage 1's
`final` -> hmt_eval, with the CPU overrides their comments document. On a tiny HF checkpoint
directory the test writes (always), and on SmolLM2-135M itself when it is on disk
(``$HMT_SMOLLM2_DIR`` or ``~/.cache/hmt_backbones/smollm2-135m``; skipped otherwise)."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hmt_plugin.bench.runs import read_metrics
from hmt_plugin.checkpointing import load_hmt_checkpoint
from hmt_plugin.cli import config_path
from hmt_plugin.recipes.hmt_eval import HMTEvalRecipe
from tests.assets import TEXT, write_hf_tokenizer
from tests.hf_checkpoints import write_hf_checkpoint
from tests.recipe_utils import run_in_process, run_recipe, write_config

SMOLLM2_DIR = Path(
    os.environ.get("HMT_SMOLLM2_DIR", Path.home() / ".cache" / "hmt_backbones" / "smollm2-135m")
)

# What each config's comment tells a CPU user to override (the data: a folder of books).
CPU = {"device": "cpu", "dtype": "fp32", "dataset.streaming": False, "dataset.max_documents": None}
CPU_TRAINING = {**CPU, "optimizer.fused": False}


def _books(root: Path, n: int, words: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    vocab = TEXT.split()
    for i in range(n):
        body = " ".join(vocab[(i * 7 + j * 3) % len(vocab)] for j in range(words))
        (root / f"book_{i}.txt").write_text(f"Book {i}.\n\n{body}\n", encoding="utf-8")
    return root


def _config(name: str, **overrides):
    cfg = OmegaConf.load(config_path(f"smollm2_135m/{name}"))
    for key, value in {**(CPU if name == "hmt_eval" else CPU_TRAINING), **overrides}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _disk_logger(out: Path):
    return {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")}


def _evaluate(cfg):
    recipe = HMTEvalRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    try:
        return recipe.evaluate()
    finally:
        recipe.cleanup()


def _tiny_setup(tmp_path, name="llama_tied_gqa"):
    """A tiny HF directory with its tokenizer, books, and the overrides that size the configs
    down to it."""
    backbone = write_hf_checkpoint(tmp_path / "model", name, vocab_size=320,
                                   max_position_embeddings=128)
    write_hf_tokenizer(backbone, bos_in_template=False,
                       generation_config={"bos_token_id": 1, "eos_token_id": 2})
    books = _books(tmp_path / "books", 6, 900)
    return {"backbone_dir": str(backbone), "dataset.source": str(books), "batch_size": 2,
            "max_steps_per_epoch": 4, "save_every_n_steps": 2, "model.segment_length": 32,
            "model.num_sensory": 4, "model.recall_hidden_dim": 32, "log_peak_memory_stats": False}


@pytest.mark.slow
def test_smollm2_configs_on_a_tiny_hf_directory(tmp_path):
    small = _tiny_setup(tmp_path)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    run_in_process("hmt_finetune_single_device", _config(
        "hmt_stage1", output_dir=str(stage1), metric_logger=_disk_logger(stage1), **small))
    assert json.loads((stage1 / "final" / "model.safetensors.index.json").read_text())["weight_map"]
    state1, cfg1, _ = load_hmt_checkpoint(stage1 / "final")
    # The configs read [sink; P_n; sensory; x_n; P_n] (memory_sink: true).
    assert cfg1.mode == "hmt_stage1" and cfg1.memory_sink and set(state1) == {"initial_memory", "sink"}

    # Stage 2's checkpointer finds stage 1's merged shards by the index torchtune wrote.
    run_in_process("hmt_finetune_single_device", _config(
        "hmt_stage2", output_dir=str(stage2), stage1_dir=str(stage1),
        metric_logger=_disk_logger(stage2), **small))
    state2, cfg2, _ = load_hmt_checkpoint(stage2 / "final")
    assert cfg2.mode == "hmt"
    assert any(k.startswith("recall.") for k in state2)

    evaluated = {}
    for run_dir, mode in ((stage2, "hmt"), (stage1, "hmt_stage1")):
        out = tmp_path / f"eval_{mode}"
        cfg = _config("hmt_eval", run_dir=str(run_dir), output_dir=str(out),
                      metric_logger=_disk_logger(out), plots=False,
                      **{k: v for k, v in small.items() if k.startswith(("backbone", "dataset", "model.s", "model.n", "model.r"))},
                      **{"runs.1.mode": mode, "context_lengths": [48, 96], "max_tokens": 200})
        _evaluate(cfg)
        evaluated[mode] = json.loads((out / "eval_results.json").read_text())["runs"]
    for runs in evaluated.values():
        assert set(runs) == {"pretrained", "hmt"}
        for run in runs.values():
            assert all(s["tokens"] > 0 and math.isfinite(s["ppl"]) for s in run["context"])


@pytest.mark.slow
def test_dora_stage1_resumes_exactly(tmp_path):
    small = {**_tiny_setup(tmp_path, "llama_untied"), "model.backbone.use_dora": True}
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    run_in_process("hmt_finetune_single_device", _config(
        "hmt_stage1", output_dir=str(out), metric_logger=_disk_logger(out), **small))
    shutil.copytree(out / "step_0000002", resumed / "step_0000002")
    run_in_process("hmt_finetune_single_device", _config(
        "hmt_stage1", output_dir=str(resumed), metric_logger=_disk_logger(resumed),
        resume_from_checkpoint=True, **small))
    again, original = read_metrics(resumed / "logs"), read_metrics(out / "logs")
    assert sorted(again) == [3, 4]
    # The trained DoRA magnitudes are restored, not re-derived from the base weights.
    assert all(again[k]["loss"] == original[k]["loss"] for k in again)


@pytest.mark.slow
def test_full_fine_tune_resumes_through_hf_checkpointer(tmp_path):
    # No LoRA: a step checkpoint holds the whole backbone, re-read by the same checkpointer.
    small = {**_tiny_setup(tmp_path), "model.backbone.lora_attn_modules": None,
             "model.backbone.apply_lora_to_mlp": False}
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    run_in_process("hmt_finetune_single_device", _config(
        "hmt_stage1", output_dir=str(out), metric_logger=_disk_logger(out), **small))
    shutil.copytree(out / "step_0000002", resumed / "step_0000002")
    run_in_process("hmt_finetune_single_device", _config(
        "hmt_stage1", output_dir=str(resumed), metric_logger=_disk_logger(resumed),
        resume_from_checkpoint=True, **small))
    again, original = read_metrics(resumed / "logs"), read_metrics(out / "logs")
    assert sorted(again) == [3, 4] and all(again[k]["loss"] == original[k]["loss"] for k in again)


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2_DIR / "config.json").is_file(),
                    reason=f"SmolLM2-135M is not at {SMOLLM2_DIR} (../shared/tools/smollm2_135m.sh)")
def test_smollm2_20_lora_steps_then_eval(tmp_path):
    """20 LoRA steps of smollm2_135m/hmt_stage1 through `hmt-tune run`, then hmt_eval on it."""
    books = _books(tmp_path / "books", 4, 2500)
    held_out = _books(tmp_path / "held_out", 2, 1500)
    out = tmp_path / "stage1"
    overrides = {"backbone_dir": str(SMOLLM2_DIR), "output_dir": str(out),
                 "dataset.source": str(books), "batch_size": 1, "max_steps_per_epoch": 20,
                 "save_every_n_steps": 10, "metric_logger": _disk_logger(out)}
    cfg = _config("hmt_stage1", **overrides)
    run_recipe("hmt_finetune_single_device", write_config(cfg, tmp_path / "stage1.yaml"), timeout=3000)
    assert (out / "final" / "hmt_model.safetensors").is_file()
    ev = tmp_path / "eval"
    eval_cfg = _config("hmt_eval", backbone_dir=str(SMOLLM2_DIR), run_dir=str(out), output_dir=str(ev),
                       metric_logger=_disk_logger(ev), plots=False, **{
                           "dataset.source": str(held_out), "runs.1.mode": "hmt_stage1",
                           "context_lengths": [512, 1024], "max_tokens": 1024})
    run_recipe("hmt_eval", write_config(eval_cfg, tmp_path / "eval.yaml"), timeout=1200)
    runs = json.loads((ev / "eval_results.json").read_text())["runs"]
    assert set(runs) == {"pretrained", "hmt"}
    for run in runs.values():
        assert all(s["tokens"] > 0 and 1 < s["ppl"] < 1e4 for s in run["context"])
