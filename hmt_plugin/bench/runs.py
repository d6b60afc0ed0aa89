"""Training runs for the quality and recall benchmarks: the fine-tuning recipe, run as a user
runs it, on configs written into the benchmark's work directory.

Nothing here trains by itself: a run is ``hmt-tune run hmt_finetune_single_device --config
<generated yaml>`` in a subprocess (its log beside the config), or, with the ``inprocess``
launcher, the same recipe class in this process (seconds saved per run on small machines;
the smoke test uses it). The trained weights are then read back from the run's ``final/``
checkpoint exactly as any user of the checkpoint would.
"""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from hmt_plugin.bench.report import stderr

RECIPE = "hmt_finetune_single_device"
LAUNCHERS = ("subprocess", "inprocess")
FINAL_WEIGHTS = "model-00001-of-00001.safetensors"


class RunFailed(RuntimeError):
    """A recipe run exited with an error; the message holds the end of its log."""


def write_config(cfg: Dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def same_config(cfg: Dict[str, Any], path: Path) -> bool:
    """Whether ``path`` already holds ``cfg`` (``--reuse`` keeps a run only if so)."""
    if not Path(path).is_file():
        return False
    return OmegaConf.to_container(OmegaConf.load(path)) == OmegaConf.to_container(OmegaConf.create(cfg))


def final_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "final"


def is_finished(run_dir: Path) -> bool:
    final = final_dir(run_dir)
    return (final / "hmt_config.json").is_file() and (final / FINAL_WEIGHTS).is_file()


def run_recipe(
    config: Path,
    *,
    launcher: str = "subprocess",
    threads: Optional[int] = None,
    cache_dir: Optional[Path] = None,
) -> float:
    """Run the fine-tuning recipe on ``config``; returns its wall time in seconds.

    The subprocess's output goes to ``<config without .yaml>.log``.

    Raises:
        RunFailed: the recipe failed (the end of its log is in the message).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}: use one of {LAUNCHERS}.")
    t0 = time.perf_counter()
    if launcher == "inprocess":
        _run_in_process(config, threads)
        return time.perf_counter() - t0
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if cache_dir is not None:
        env["HMT_CACHE_DIR"] = str(cache_dir)
    log = config.with_suffix(".log")
    command = [sys.executable, "-m", "hmt_plugin.cli", "run", RECIPE, "--config", str(config)]
    stderr(f"    $ hmt-tune run {RECIPE} --config {config}   (log: {log})")
    with open(log, "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RunFailed(f"{' '.join(command)} exited {proc.returncode}; end of {log}:\n{tail}")
    return time.perf_counter() - t0


def _run_in_process(config: Path, threads: Optional[int]) -> None:
    from hmt_plugin.recipes.hmt_finetune_single_device import HMTFinetuneRecipeSingleDevice

    if threads:
        torch.set_num_threads(threads)
    cfg = OmegaConf.load(config)
    recipe = HMTFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


def read_metrics(log_dir: Path) -> Dict[int, Dict[str, float]]:
    """Per step, what torchtune's ``DiskLogger`` wrote (``Step N | name:value ...``); for a step
    logged twice (a resumed run starts a new file), the newer file wins."""
    steps: Dict[int, Dict[str, float]] = {}
    for path in sorted(Path(log_dir).glob("*.txt"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text().splitlines():
            match = re.match(r"Step (\d+) \| (.*)", line)
            if not match:
                continue
            values = {}
            for item in match.group(2).split():
                name, _, value = item.partition(":")
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
            steps[int(match.group(1))] = values
    return steps


def last_metrics(log_dir: Path, window: int = 5) -> Dict[str, float]:
    """Mean of each metric over the last ``window`` logged steps (a less noisy final loss)."""
    steps = read_metrics(log_dir)
    if not steps:
        return {}
    last = [steps[k] for k in sorted(steps)[-window:]]
    keys = set().union(*last)
    return {
        k: sum(s[k] for s in last if k in s) / sum(1 for s in last if k in s) for k in sorted(keys)
    } | {"last_step": max(steps)}


def schedule(total_steps: int, batches_per_epoch: int) -> Dict[str, int]:
    """``epochs`` and ``max_steps_per_epoch`` giving at least ``total_steps`` optimizer steps
    with the recipe's epoch loop (which stops an epoch after ``max_steps_per_epoch``)."""
    if batches_per_epoch < 1:
        raise ValueError("the training data cannot fill one batch; add data or lower batch_size.")
    epochs = max(1, math.ceil(total_steps / batches_per_epoch))
    return {"epochs": epochs, "max_steps_per_epoch": math.ceil(total_steps / epochs)}


def seconds_per_step(build_model, batch_size: int, window: int, lr: float, steps: int = 3) -> float:
    """Wall time of one optimizer step (forward, backward, AdamW) of a freshly built model on
    random tokens, after one warm-up step: how many steps fit in a time budget."""
    from hmt_plugin.training.loss import batch_loss

    model = build_model()
    model.train()
    vocab = model.backbone.tok_embeddings.num_embeddings
    tokens = torch.randint(0, vocab, (batch_size, window))
    batch = {"tokens": tokens, "labels": tokens, "seq_lens": torch.full((batch_size,), window)}
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = batch_loss(model, batch, tokens.device, "last")
        (loss.loss_sum / loss.num_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def load_trained(
    run_final: Path,
    build_model,
    *,
    device: str = "cpu",
    work_dir: Optional[Path] = None,
) -> torch.nn.Module:
    """An HMT model with the weights of a run's ``final/`` checkpoint: the backbone through
    torchtune's ``FullModelHFCheckpointer``, the HMT parameters from ``hmt_model.safetensors``
    (those the checkpoint lacks, e.g. recall parameters of a stage-1 run, stay freshly drawn).

    Args:
        run_final: the ``final`` directory.
        build_model: a function returning the model to load into (the checkpoint's settings).
        device: where to put the model.
        work_dir: scratch output directory for the checkpointer (it writes nothing on load).
    """
    from torchtune.training import FullModelHFCheckpointer, MODEL_KEY

    from hmt_plugin.checkpointing.hmt_files import load_hmt_checkpoint
    from hmt_plugin.training.model_setup import initial_state_dict, load_initial_state

    run_final = Path(run_final)
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(run_final),
        checkpoint_files=[FINAL_WEIGHTS],
        model_type="LLAMA3",
        output_dir=str(work_dir or run_final.parent / "eval_scratch"),
    )
    base = checkpointer.load_checkpoint()[MODEL_KEY]
    model = build_model()
    saved, _, _ = load_hmt_checkpoint(run_final)
    full = initial_state_dict(
        model, base, lora=None, seed=0, hmt_checkpoint=run_final if saved else None
    )
    load_initial_state(model, full, None)
    return model.to(device).eval()


def hmt_settings_from(run_final: Path) -> Dict[str, Any]:
    """The :class:`HMTConfig` a run trained with, as keyword arguments of the builders."""
    from hmt_plugin.checkpointing.hmt_files import load_hmt_checkpoint

    _, config, _ = load_hmt_checkpoint(run_final)
    return config.to_dict()


def disk_logger(log_dir: Path) -> Dict[str, Any]:
    return {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(log_dir)}


def cosine_schedule(total_steps: int) -> Dict[str, Any]:
    return {
        "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "num_warmup_steps": max(1, min(100, total_steps // 10)),
    }

