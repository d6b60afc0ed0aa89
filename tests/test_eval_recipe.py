"""The hmt_eval recipe on tiny real assets (an HF backbone, a SentencePiece tokenizer, an HMT
checkpoint and a folder of books, all written by the test): through ``hmt-tune run`` once,
in-process for the other settings and the errors."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hmt_plugin.checkpointing import save_hmt_checkpoint, write_tiny_hf_llama
from hmt_plugin.cli import config_path
from hmt_plugin.models import hmt_tiny
from hmt_plugin.training.run_config import ConfigError
from tests.assets import TEXT, write_sentencepiece
from tests.recipe_utils import run_recipe, write_config

HMT_SETTINGS = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=8)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eval_assets(root: Path):
    """A tiny Llama in HF format, a tokenizer, an HMT checkpoint for it and three books."""
    root.mkdir(parents=True, exist_ok=True)
    backbone = write_tiny_hf_llama(root / "backbone", seed=0, max_seq_len=64)
    tokenizer = write_sentencepiece(root / "tokenizer", vocab_size=256)
    torch.manual_seed(0)
    model = hmt_tiny(max_seq_len=64, **HMT_SETTINGS)
    hmt_dir = root / "hmt"
    save_hmt_checkpoint(hmt_dir, model.hmt_state_dict(), model.config)
    books = root / "books"
    books.mkdir(exist_ok=True)
    words = TEXT.split()
    for i, n in enumerate((300, 500, 150)):
        body = " ".join(words[(i * 5 + j) % len(words)] for j in range(n))
        (books / f"book_{i}.txt").write_text(body + "\n", encoding="utf-8")
    return {"backbone": backbone, "tokenizer": tokenizer, "hmt": hmt_dir, "books": books}


def model_node(**overrides):
    return {
        "_component_": "hmt_plugin.models.hmt_tiny",
        "max_seq_len": 64,
        "mode": "hmt",
        **HMT_SETTINGS,
        **overrides,
    }


def tiny_checkpointer(assets, out):
    return {
        "_component_": "hmt_plugin.checkpointing.tiny_llama_checkpointer",
        "checkpoint_dir": str(assets["backbone"]),
        "output_dir": str(out),
    }


def eval_config(assets, out: Path, **overrides):
    """configs/tiny/hmt_eval_cpu.yaml pointed at the tiny assets."""
    cfg = OmegaConf.load(config_path("tiny/hmt_eval_cpu"))
    cfg.backbone_dir = str(assets["backbone"])
    cfg.run_dir = str(out / "unused")
    cfg.output_dir = str(out)
    cfg.model = model_node()
    cfg.checkpointer = tiny_checkpointer(assets, out)
    cfg.hmt_checkpoint = str(assets["hmt"])
    cfg.tokenizer.path = str(assets["tokenizer"])
    cfg.dataset.source = str(assets["books"])
    cfg.dataset.strip_gutenberg = False
    cfg.context_lengths = [30, 100, 300]
    cfg.max_tokens = 300
    cfg.chunk_segments = 4
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_in_process(cfg):
    from hmt_plugin.recipes.hmt_eval import HMTEvalRecipe

    recipe = HMTEvalRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    try:
        return recipe.evaluate()
    finally:
        recipe.cleanup()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return eval_assets(tmp_path_factory.mktemp("eval_assets"))


def _scalars(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["tensors"] + acc.Tags()["scalars"]:
            items = acc.Tensors(tag) if tag in acc.Tags()["tensors"] else acc.Scalars(tag)
            out[tag] = {
                e.step: (
                    float(e.tensor_proto.float_val[0]) if hasattr(e, "tensor_proto") else e.value
                )
                for e in items
            }
    return out


def test_eval_recipe_writes_results_plots_and_tensorboard(assets, tmp_path):
    import json

    out = tmp_path / "eval"
    cfg = eval_config(assets, out, published_test_ppl={"test_lengths": [36], "batch_size": 2, "test_step": 2})
    proc = run_recipe("hmt_eval", write_config(cfg, tmp_path / "eval.yaml"))
    report = json.loads((out / "eval_results.json").read_text())
    assert set(report["runs"]) == {"baseline", "rmt", "hmt"}
    assert report["memory_probe"]["name"] == "tensor_bytes"
    for label, run in report["runs"].items():
        assert [s["context_length"] for s in run["context"]] == [30, 100, 300]
        assert all(
            s["tokens"] > 0 and s["ppl"] > 1 and s["peak_memory_mb"] > 0 for s in run["context"]
        )
        assert run["document"]["documents"] == 3 and run["document"]["ppl"] > 1
    assert report["runs"]["hmt"]["recall_distance"] and not report["runs"]["rmt"]["recall_distance"]
    # Every mode reads hmt's 18 new tokens per segment (baseline: in an 18-token call).
    assert {run["tokens_per_segment"] for run in report["runs"].values()} == {18}
    for run in report["runs"].values():
        (published,) = run["published_test"]
        assert (published["test_length"], published["batches"], published["windows"]) == (36, 2, 4)
        assert published["ppl"] >= published["token_ppl"] > 1
    assert "Published test PPL" in proc.stdout
    for name in ("ppl_vs_context.png", "recall_distance_hist.png"):
        assert (out / name).stat().st_size > 1000
    scalars = _scalars(out / "logs")
    assert sorted(scalars["ppl_last_segment/hmt"]) == [30, 100, 300]
    assert sorted(scalars["peak_memory_mb/rmt"]) == [30, 100, 300]
    assert "ppl_document/baseline" in scalars
    assert "Last-segment perplexity after T tokens of context" in proc.stdout
    assert "eval_results.json" in proc.stdout


def test_runs_of_different_checkpoints_and_lm_eval_tasks(assets, tmp_path):
    pytest.importorskip("lm_eval")
    from tests.test_lm_eval import _write_tasks

    tasks = _write_tasks(tmp_path)
    out = tmp_path / "runs"
    cfg = eval_config(
        assets,
        out,
        modes=None,
        runs=[
            {"name": "backbone", "mode": "baseline", "hmt_checkpoint": None},
            {"name": "trained", "mode": "hmt"},
        ],
        context_lengths=[50, 200],
        document_ppl=False,
        plots=False,
        lm_eval={
            "tasks": ["tiny_mc"],
            "include_path": str(tasks),
            "include_defaults": False,
            "limit": 2,
        },
    )
    report = run_in_process(cfg)
    assert list(report["runs"]) == ["backbone", "trained"]
    for run in report["runs"].values():
        assert run["document"] is None and [s["context_length"] for s in run["context"]] == [
            50,
            200,
        ]
        assert 0 <= run["lm_eval"]["tiny_mc"]["acc,none"] <= 1
    # The pretrained backbone in baseline mode reads the trained run's 18 new tokens per
    # segment (keep_tokens_per_segment): both score the same tokens.
    assert report["runs"]["backbone"]["tokens_per_segment"] == 18
    assert report["runs"]["trained"]["tokens_per_segment"] == 18
    assert not (out / "ppl_vs_context.png").exists()


def test_lm_eval_only(assets, tmp_path):
    pytest.importorskip("lm_eval")
    from tests.test_lm_eval import _write_tasks

    tasks = _write_tasks(tmp_path)
    cfg = eval_config(
        assets,
        tmp_path / "only",
        modes=["hmt"],
        context_lengths=None,
        document_ppl=False,
        dataset=None,
        lm_eval={
            "tasks": ["tiny_text"],
            "include_path": str(tasks),
            "include_defaults": False,
            "limit": 2,
        },
    )
    report = run_in_process(cfg)
    assert report["runs"]["hmt"]["lm_eval"]["tiny_text"]["word_perplexity,none"] > 1


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"modes": ["hmt", "bogus"]}, r"modes: 'bogus' is not an HMT mode"),
        (
            {"context_lengths": [100, 5000]},
            r"context_lengths \[5000\] exceed the longest document \(300 tokens, max_tokens=300\)",
        ),
        ({"context_lengths": [0]}, r"integer >= 2"),
        ({"context_length": [10]}, r"Did you mean 'context_lengths'"),
        ({"runs": [{"mode": "hmt"}]}, r"either `modes`"),
        ({"modes": None, "runs": [{"mode": "rmt"}, {"mode": "rmt"}]}, r"repeat"),
        (
            {"modes": None, "runs": [{"mode": "hmt", "checkpoint": "x"}]},
            r"unknown config key runs\[0\]\.'checkpoint'",
        ),
        ({"hmt_checkpoint": "/no/such/dir"}, r"hmt_checkpoint='/no/such/dir' does not exist"),
        (
            {"model.segment_length": 32},
            r"model.segment_length=32 but the checkpoint .* was trained with segment_length=24",
        ),
        ({"lm_eval": {"tasks": []}}, r"lm_eval.tasks is empty"),
        ({"memory_probe": "vram"}, r"memory_probe='vram'"),
    ],
)
def test_bad_configs_are_named(assets, tmp_path, overrides, match):
    cfg = eval_config(assets, tmp_path / "bad", **overrides)
    with pytest.raises(ConfigError, match=match):
        run_in_process(cfg)


def test_missing_backbone_directory_is_named(assets, tmp_path):
    cfg = eval_config(assets, tmp_path / "bad")
    cfg.checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(tmp_path / "nowhere"),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "LLAMA3",
        "output_dir": str(tmp_path),
    }
    with pytest.raises(ConfigError, match=r"checkpointer.checkpoint_dir=.*nowhere' does not exist"):
        run_in_process(cfg)
