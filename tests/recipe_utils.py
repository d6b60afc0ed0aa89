"""Run our recipes as a user does (``hmt-tune run ...`` in a subprocess) on tiny real assets."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from hmt_plugin.checkpointing.tiny_checkpoint import write_tiny_hf_llama
from hmt_plugin.cli import config_path
from tests.assets import TEXT, write_sentencepiece

HMT_TUNE = [sys.executable, "-m", "hmt_plugin.cli"]

TINY_BACKBONE = dict(
    vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
    intermediate_dim=128, max_seq_len=256,
)


def make_assets(root: Path) -> Dict[str, Path]:
    """An HF checkpoint of a tiny Llama, a SentencePiece tokenizer and a folder of documents."""
    root.mkdir(parents=True, exist_ok=True)
    backbone = write_tiny_hf_llama(root / "backbone", seed=0, max_seq_len=256)
    tokenizer = write_sentencepiece(root / "tokenizer", vocab_size=256)
    (backbone / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    books = root / "books"
    books.mkdir(exist_ok=True)
    words = TEXT.split()
    for i in range(6):
        body = " ".join(words[(i * 7 + j) % len(words)] for j in range(900 + 40 * i))
        (books / f"book_{i}.txt").write_text(f"Book {i}.\n\n{body}\n", encoding="utf-8")
    return {"backbone": backbone, "tokenizer": tokenizer, "books": books}


def lora_config(assets: Dict[str, Path], output_dir: Path, **overrides: Any) -> Dict[str, Any]:
    """configs/tiny/hmt_lora_cpu.yaml, pointed at the tiny assets."""
    cfg = OmegaConf.load(config_path("tiny/hmt_lora_cpu"))
    cfg.backbone_dir = str(assets["backbone"])
    cfg.output_dir = str(output_dir)
    cfg.model.backbone.update(TINY_BACKBONE)
    cfg.model.segment_length = 32
    cfg.model.num_sensory = 4
    cfg.model.recall_hidden_dim = 32
    cfg.model.bptt_depth = 2
    cfg.dataset.source = str(assets["books"])
    cfg.batch_size = 2
    cfg.max_steps_per_epoch = 4
    cfg.save_every_n_steps = 2
    cfg.keep_last_n_checkpoints = None
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": str(output_dir / "logs")}
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def demo_config(output_dir: Path, **overrides: Any) -> Dict[str, Any]:
    """configs/tiny/hmt_demo_cpu.yaml (full fine-tune, synthetic data), made small."""
    cfg = OmegaConf.load(config_path("tiny/hmt_demo_cpu"))
    cfg.output_dir = str(output_dir)
    cfg.dataset.num_documents = 96
    cfg.batch_size = 4
    cfg.max_steps_per_epoch = 6
    cfg.save_every_n_steps = 2
    cfg.keep_last_n_checkpoints = None
    cfg.validation = None
    cfg.log_every_n_steps = 1
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": str(output_dir / "logs")}
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def write_config(cfg, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("HF_DATASETS_OFFLINE", "1")
    e["OMP_NUM_THREADS"] = "1"
    return e


def run(args: List[str], *, cwd: Optional[Path] = None, timeout: int = 300, check: bool = True):
    proc = subprocess.run(
        args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def run_recipe(recipe: str, config: Path, *extra: str, nproc: int = 1, **kw):
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    return run([*HMT_TUNE, "run", *launch, recipe, "--config", str(config), *extra], **kw)


def run_in_process(recipe: str, cfg) -> None:
    """Run a recipe's class in this process (what ``recipe_main`` does, without re-importing
    torch and torchtune in a new interpreter: seconds per run on 2 cores)."""
    import importlib

    from omegaconf import DictConfig

    module = importlib.import_module(f"hmt_plugin.recipes.{recipe}")
    cls = next(
        v for k, v in vars(module).items()
        if isinstance(v, type) and k.startswith("HMT") and k.endswith(("SingleDevice", "Distributed"))
    )
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    instance = cls(cfg=cfg)
    instance.setup(cfg=cfg)
    instance.train()
    instance.cleanup()
