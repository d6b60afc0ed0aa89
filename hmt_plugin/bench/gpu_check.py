"""The GPU check: what only a GPU can show, as one command that fits in about 8 minutes on one
H100/H200-class GPU and writes one JSON record.

    python -m hmt_plugin.bench gpu-check --out gpu_check.json          # on the GPU machine
    python -m hmt_plugin.bench gpu-check --device cpu --quick          # a dry run, seconds

Parts, each run as its own process (as a user runs it) under its own time limit, so one that
fails or hangs is recorded and the others still run:

* ``speed``: ``bench speed-gpu`` in bf16 on a Llama 3.2 1B-sized random backbone: HMT
  evaluation against the bare backbone read segment by segment (and full attention), and
  training steps against the bare backbone;
* ``int4``: ``bench quantized --scheme int4_weight_only`` (torchao, CUDA only) against bf16;
* ``fsdp2``: the distributed recipe under torchrun, one process, NCCL (gloo on CPU), on the
  tiny demo config (a random checkpoint it writes itself), with a few optimizer steps;
* ``smollm2``: a few training steps of ``smollm2_135m/hmt_stage1`` on the real SmolLM2-135M
  checkpoint, if it is on the machine (``$HMT_SMOLLM2_DIR``, else
  ``~/.cache/hmt_backbones/smollm2-135m``) or ``--smollm2_script`` (the shared
  ``tools/smollm2_135m.sh``, which needs PyPI) can make it in the time left; else recorded
  as skipped with the reason.

With ``--quick`` every part runs at a tiny size (``speed --tiny``, int8 instead of int4 off
CUDA, 3 recipe steps), which is what the test suite exercises on CPU.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from hmt_plugin.bench.report import BenchRun, machine_info, markdown_table, stderr
from hmt_plugin.bench.runs import disk_logger, read_metrics

PARTS = ("speed", "int4", "fsdp2", "smollm2")
# Seconds each part may take on the GPU (the whole check: about 8 minutes).
LIMITS_S = {"speed": 210, "int4": 90, "fsdp2": 90, "smollm2": 150}
SMOLLM2_DEFAULT = Path.home() / ".cache" / "hmt_backbones" / "smollm2-135m"


def _bench(name: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "hmt_plugin.bench", name, *args]


def _tune_run(recipe: str, config: str, *overrides: str, nproc: Optional[int] = None) -> List[str]:
    """``hmt-tune run`` of a shipped recipe on a shipped config (given by its file, so a config
    that is not in the ``hmt-tune ls`` list runs too)."""
    from hmt_plugin.cli import config_path

    launch = ["--nproc_per_node", str(nproc)] if nproc else []
    return [sys.executable, "-m", "hmt_plugin.cli", "run", *launch, recipe, "--config",
            str(config_path(config)), *overrides]


def run_part(name: str, command: List[str], limit_s: float, log: Path) -> Dict[str, Any]:
    """Run one part as a subprocess; its output goes to ``log``. Never raises."""
    stderr(f"[{name}] {' '.join(command)} (limit {limit_s:.0f} s)")
    t0 = time.perf_counter()
    entry: Dict[str, Any] = {"command": command, "limit_s": round(limit_s), "log": str(log)}
    with open(log, "w") as out:
        try:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=limit_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            entry["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            entry["status"] = f"timeout after {limit_s:.0f} s"
        except OSError as err:
            entry["status"] = f"could not start ({err})"
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    if entry["status"] != "ok":
        entry["log_tail"] = log.read_text(errors="replace")[-3000:]
    stderr(f"[{name}] {entry['status']} in {entry['wall_s']} s")
    return entry


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def speed_summary(record: Dict[str, Any]) -> Dict[str, Any]:
    """The figures worth a line: HMT / bare backbone time ratios for eval and training."""
    res = record["results"]
    return {
        "eval": [{"length": c["length"], "hmt_tok_s": (c.get("hmt") or {}).get("tokens_per_s"),
                  "bare_tok_s": (c.get("baseline") or {}).get("tokens_per_s"),
                  "full_tok_s": (c.get("full") or {}).get("tokens_per_s"),
                  "ratio_hmt_over_bare": c.get("ratio_hmt_over_baseline"),
                  "hmt_peak_mb": (c.get("hmt") or {}).get("peak_mb")} for c in res["eval"]],
        "train": [{"depth": c["bptt_depth"], "loss_scope": c["loss_scope"],
                   "hmt_tok_s": c["hmt"].get("tokens_per_s"),
                   "bare_tok_s": c["baseline"].get("tokens_per_s"),
                   "ratio_hmt_over_bare": c.get("ratio_hmt_over_baseline"),
                   "hmt_peak_mb": c["hmt"].get("peak_mb")} for c in res["train"]],
    }


def quantized_summary(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in record["results"].items() if k != "cells"} | {
        "cells": [{k: c.get(k) for k in ("length", "time_ratio", "nll_change")}
                  | {"full_tok_s": (c.get("full") or {}).get("tokens_per_s"),
                     "quantized_tok_s": (c.get("quantized") or {}).get("tokens_per_s")}
                  for c in record["results"].get("cells", [])]
    }


def metrics_summary(log_dir: Path) -> Dict[str, Any]:
    steps = read_metrics(log_dir)
    if not steps:
        return {"logged_steps": 0}
    first, last = min(steps), max(steps)
    return {"logged_steps": len(steps), "first_step": first, "last_step": last,
            "first": steps[first], "last": steps[last]}


def smollm2_dir(args: argparse.Namespace, work: Path, deadline: float) -> Dict[str, Any]:
    """Where the SmolLM2 checkpoint is, making it with the shared script if it is absent."""
    path = Path(os.environ.get("HMT_SMOLLM2_DIR") or SMOLLM2_DEFAULT)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return {"dir": str(path)}
    script = Path(args.smollm2_script)
    if not script.is_file():
        return {"skipped": f"no SmolLM2 checkpoint at {path} and no {script} to make one"}
    left = deadline - time.perf_counter() - 60
    if left < 60:
        return {"skipped": f"no SmolLM2 checkpoint at {path}; too little time left to make one"}
    made = run_part("smollm2 script", ["bash", str(script), str(path)], left,
                    work / "smollm2_script.log")
    if made["status"] != "ok":
        return {"skipped": f"{script} did not make the checkpoint: {made['status']}",
                "script": made}
    return {"dir": str(path), "script": made}


def run_check(args: argparse.Namespace) -> Dict[str, Any]:
    on_gpu = args.device.startswith("cuda")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hmt_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    parts: Dict[str, Any] = {}

    def limit(name: str) -> float:
        # Twice the GPU limits at --quick size: there they only catch a hang, and on a busy
        # 2-core CPU a one-process FSDP2 run or the int4 stand-in takes a minute or more.
        scale = 2.0 if args.quick else 1.0
        return max(10.0, min(scale * LIMITS_S[name], deadline - time.perf_counter()))

    if "speed" in args.parts:
        out = work / "speed.json"
        if args.quick:
            cmd = _bench("speed", "--tiny", "--device", args.device, "--profile", "never",
                         "--no_rss", "--out", str(out))
        else:
            cmd = _bench("speed-gpu", "--device", args.device, "--lengths", "10000", "30000",
                         "--train_depths", "2", "6", "--train_loss_scopes", "last", "--repeats",
                         "2", "--train_repeats", "2", "--profile", "never", "--out", str(out))
        entry = run_part("speed", cmd, limit("speed"), work / "speed.log")
        if entry["status"] == "ok" and _read_json(out):
            entry["figures"] = speed_summary(_read_json(out))
        parts["speed"] = entry

    if "int4" in args.parts:
        out = work / "quantized.json"
        scheme = "int4_weight_only" if on_gpu else "int8_weight_only"
        if args.quick:
            cmd = _bench("quantized", "--tiny", "--device", args.device, "--scheme", scheme,
                         "--out", str(out))
        else:
            cmd = _bench("quantized", "--device", args.device, "--dtype", "bf16", "--preset",
                         "llama3_2_1b", "--scheme", scheme, "--lengths", "10000", "--repeats",
                         "2", "--out", str(out))
        entry = run_part("int4", cmd, limit("int4"), work / "quantized.log")
        entry["scheme"] = scheme
        if not on_gpu:
            entry["note"] = "int4_weight_only needs CUDA; int8_weight_only ran instead"
        if entry["status"] == "ok" and _read_json(out):
            entry["figures"] = quantized_summary(_read_json(out))
        parts["int4"] = entry

    if "fsdp2" in args.parts:
        run_dir = work / "fsdp2"
        steps = 3 if args.quick else 20
        cmd = _tune_run(
            "hmt_finetune_distributed", "tiny/hmt_demo_cpu",
            f"output_dir={run_dir}", f"device={args.device}",
            f"dtype={'bf16' if on_gpu else 'fp32'}", f"max_steps_per_epoch={steps}",
            "log_every_n_steps=1", "save_every_n_steps=null", "validation=null",
            f"metric_logger._component_={disk_logger(run_dir)['_component_']}",
            f"metric_logger.log_dir={run_dir / 'logs'}",
            nproc=1,
        )
        entry = run_part("fsdp2", cmd, limit("fsdp2"), work / "fsdp2.log")
        entry["backend"] = "nccl" if on_gpu else "gloo"
        entry["figures"] = metrics_summary(run_dir / "logs")
        if entry["status"] == "ok" and entry["figures"]["logged_steps"] < steps:
            entry["status"] = f"failed (logged {entry['figures']['logged_steps']} of {steps} steps)"
        parts["fsdp2"] = entry

    if "smollm2" in args.parts:
        from hmt_plugin.cli import config_path

        found = smollm2_dir(args, work, deadline)
        if not config_path("smollm2_135m/hmt_stage1").is_file():
            parts["smollm2"] = {"status": "skipped", "skipped": "no smollm2_135m/hmt_stage1 config"}
        elif "dir" not in found:
            parts["smollm2"] = {"status": "skipped", **found}
        else:
            run_dir = work / "smollm2"
            docs = work / "smollm2_docs"
            docs.mkdir(exist_ok=True)
            # Real English text that is on every machine with this package: its README.
            readme = Path(__file__).resolve().parents[2] / "README.md"
            text = readme.read_text() if readme.is_file() else "HMT reads long documents. " * 4000
            for i in range(4):
                (docs / f"doc{i}.txt").write_text(text)
            steps = 3 if args.quick else 10
            cmd = _tune_run(
                "hmt_finetune_single_device", "smollm2_135m/hmt_stage1",
                f"backbone_dir={found['dir']}", f"output_dir={run_dir}", f"device={args.device}",
                f"dtype={'bf16' if on_gpu else 'fp32'}", f"max_steps_per_epoch={steps}",
                f"batch_size={8 if on_gpu else 1}", f"optimizer.fused={str(on_gpu).lower()}",
                f"dataset.source={docs}", "dataset.streaming=false", "dataset.max_documents=null",
                "dataset.strip_gutenberg=false", "save_every_n_steps=null", "log_every_n_steps=1",
                f"metric_logger._component_={disk_logger(run_dir)['_component_']}",
                f"metric_logger.log_dir={run_dir / 'logs'}",
            )
            entry = run_part("smollm2", cmd, limit("smollm2"), work / "smollm2.log")
            entry["checkpoint"] = found
            entry["figures"] = metrics_summary(run_dir / "logs")
            parts["smollm2"] = entry
    return {"work_dir": str(work), "parts": parts}


def tables(record: Dict[str, Any]) -> str:
    rows = []
    for name, part in record["results"]["parts"].items():
        rows.append([name, part.get("status"), part.get("wall_s"), part.get("limit_s")])
    return "\n".join([f"## {record['benchmark']}\n", markdown_table(
        ["part", "status", "wall s", "limit s"], rows)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hmt_plugin.bench gpu-check",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="the whole check; parts that start late get what is left")
    p.add_argument("--quick", action="store_true", help="every part at a tiny size (CPU dry run)")
    p.add_argument("--smollm2_script", default=str(Path("..") / "shared" / "tools" / "smollm2_135m.sh"))
    p.add_argument("--work_dir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--out", default="outputs/bench/gpu_check.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu --quick "
                     "for a dry run")
    run = BenchRun("gpu-check", argv)
    results = run_check(args)
    record = run.finish(args.out, tables, settings=vars(args), results=results,
                        machine=machine_info(args.device, "bf16" if args.device != "cpu" else "fp32"))
    return record
