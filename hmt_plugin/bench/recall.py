"""Recall: accuracy on the synthetic long-range recall task by distance in segments, for
``baseline``, ``rmt`` and ``hmt`` trained the same way.

    python -m hmt_plugin.bench recall            # about 10-15 minutes on 2 CPU cores
    python -m hmt_plugin.bench recall --quick    # about a minute
    python -m hmt_plugin.bench recall --backbone DIR --modes baseline hmt_stage1 ...  # pretrained

With ``--backbone`` (a Hugging Face checkpoint directory, as in ``bench quality``) every model
fine-tunes that pretrained backbone instead of a random tiny Llama, and the task is rendered as
text through its ``tokenizer.json`` (the pass-key wording; the value is ``--value_length``
digits; the table gives exact keys, chance 10^-value_length): can the pretrained decoder learn
to carry a fact through its memory at the budget the quality benchmark gives it?

The task (:func:`hmt_plugin.data.synthetic_recall_dataset`): a value planted at the start
of one segment must be produced ``d`` segments later, after a question; only the answer is
scored. Every model reads HMT's number of new tokens per segment (``baseline`` and ``rmt``
in a shorter backbone call, as the mode comparisons elsewhere do), so the documents and the
segment boundaries the value must cross are the same for every model. ``d = 0`` (needle and
question in one segment) is the control every model should solve.

Every model starts from the same random tiny Llama and trains with the fine-tuning recipe
(the demo config's settings) for the same number of steps, on windows holding whole
documents, with gradients through all their segments. Then each reads fresh documents at
each distance; the HMT weights are also read without recall (``hmt_stage1`` mode).
Chance is ``1 / num_symbols``.
"""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from hmt_plugin.bench import runs
from hmt_plugin.bench.report import (
    BenchRun,
    apply_quick,
    header,
    machine_info,
    markdown_table,
    stderr,

)
from hmt_plugin.modules.hmt_config import MEMORY_INITS

DIMS = dict(vocab_size=32, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_dim=128)
MODELS = ("baseline", "rmt", "hmt")
QUICK = dict(distances=[0, 1, 2], steps=25, batch_size=16, eval_documents=64)


def _task(args, tokens_per_segment: int, distances, num_documents: int, seed: int) -> Dict[str, Any]:
    # Token ids for the random tiny Llama; the pass-key text through a pretrained backbone's
    # tokenizer (the recipe passes its tokenizer to the dataset).
    rendering = ({"value_length": args.value_length} if args.backbone else
                 {"vocab_size": DIMS["vocab_size"], "num_symbols": args.num_symbols})
    return {
        "_component_": "hmt_plugin.data.synthetic_recall_dataset",
        "num_documents": num_documents, "tokens_per_segment": tokens_per_segment,
        "distance_segments": list(distances) if len(distances) > 1 else distances[0],
        **rendering, "needle_position": args.needle_position, "seed": seed,
    }


def _settings(args, mode: str, depth: int) -> Dict[str, Any]:
    from hmt_plugin.modules.hmt_config import HMTConfig

    # Every model reads HMT's new tokens per segment (``baseline`` and ``rmt`` in a shorter
    # backbone call), so the segments, and the distances, are the same for all of them.
    hmt = HMTConfig(mode="hmt", segment_length=args.segment_length, num_sensory=args.num_sensory)
    length = hmt.with_mode(mode, keep_tokens_per_segment=True).segment_length
    return dict(mode=mode, segment_length=length, num_sensory=args.num_sensory,
                recall_hidden_dim=args.recall_hidden_dim, cache_size=args.cache_size,
                bptt_depth=depth)


def _build(settings: Dict[str, Any]):
    from hmt_plugin.models import hmt_tiny

    return hmt_tiny(**DIMS, max_seq_len=args_max_seq_len(settings["segment_length"]), **settings)


def args_max_seq_len(segment_length: int) -> int:
    return max(64, segment_length)


def _pretrained_nodes(args, mode: str, run_dir: Path, depth: int) -> Dict[str, Any]:
    """The model, checkpointer and tokenizer nodes of a run on ``--backbone``: the quality
    benchmark's, so both benchmarks fine-tune a pretrained backbone the same way."""
    from hmt_plugin.bench.quality import equal_segment_lengths
    from hmt_plugin.bench.quality_pretrained import checkpointer_node, hf_model_node, tokenizer_node

    # HMT's new tokens per segment in every mode (a sink adds a position, never a token).
    length = equal_segment_lengths(args.segment_length, args.num_sensory, args.memory_sink)[mode]
    return {"checkpointer": checkpointer_node(Path(args.backbone), run_dir),
            "model": hf_model_node(args, mode=mode, segment_length=length, bptt_depth=depth,
                                   lora=False),
            "tokenizer": tokenizer_node(args)}


def _tiny_nodes(args, mode: str, run_dir: Path, work: Path, depth: int) -> Dict[str, Any]:
    return {
        "checkpointer": {
            "_component_": "hmt_plugin.checkpointing.tiny_llama_checkpointer",
            # One random backbone, written by the first run, read by all the others.
            "checkpoint_dir": str(work / "runs" / "random_init"), "output_dir": str(run_dir),
            **DIMS, "max_seq_len": args_max_seq_len(args.segment_length), "seed": args.seed,
        },
        "model": {"_component_": "hmt_plugin.models.hmt_tiny", **DIMS,
                  "max_seq_len": args_max_seq_len(args.segment_length),
                  **_settings(args, mode, depth)},
        "tokenizer": None,
    }


def recipe_config(args, mode: str, run_dir: Path, work: Path) -> Dict[str, Any]:
    from hmt_plugin.modules.hmt_config import HMTConfig

    depth = max(args.distances) + 1  # a window holds a whole document: needle to answer
    tps = HMTConfig(**_settings(args, mode, depth)).tokens_per_segment
    nodes = (_pretrained_nodes(args, mode, run_dir, depth) if args.backbone
             else _tiny_nodes(args, mode, run_dir, work, depth))
    return {
        "output_dir": str(run_dir), "seed": args.seed, "device": "cpu", "dtype": "fp32",
        **nodes,
        "dataset": _task(args, tps, args.distances, args.steps * args.batch_size, args.seed),
        "windows": {"segments_per_window": depth, "random_offset": False},
        "collate_fn": "hmt_plugin.data.segment_collate", "shuffle": True,
        "batch_size": args.batch_size, "loss_scope": "last",
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 0.0},
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": max(1, min(20, args.steps // 10)),
        },
        "epochs": 1, "max_steps_per_epoch": args.steps, "gradient_accumulation_steps": 1,
        "clip_grad_norm": 1.0, "compile": False, "enable_activation_checkpointing": False,
        "metric_logger": runs.disk_logger(run_dir / "logs"), "log_every_n_steps": 5,
        "save_every_n_steps": None, "keep_last_n_checkpoints": 1,
    }


def evaluate(model, args, mode: str, distances: List[int], tokenizer=None) -> Dict[str, Any]:
    """Answer accuracy of ``model`` read in ``mode``, per distance, on fresh documents
    (rendered through ``tokenizer`` where the runs trained on text)."""
    from hmt_plugin.data import synthetic_recall_dataset
    from hmt_plugin.eval.scoring import score_mode

    tps = model.config.with_mode(mode).tokens_per_segment
    out = {}
    for d in distances:
        task = _task(args, tps, [d], args.eval_documents, seed=10_000 + d)
        task.pop("_component_")
        docs = synthetic_recall_dataset(tokenizer, **task)
        score = score_mode(model, docs, mode=mode, batch_size=args.eval_batch_size)
        out[str(d)] = {"accuracy": round(score.accuracy, 4),
                       "exact_match": round(score.exact_match, 4), "documents": score.documents,
                       "answer_nll": round(score.nll, 4)}
    return out


def load_run(args, run_dir: Path, work: Path):
    """A finished run's model, and the tokenizer its documents were rendered with (None for
    the token-level task)."""
    final = runs.final_dir(run_dir)
    settings = runs.hmt_settings_from(final)
    if not args.backbone:
        return runs.load_trained(final, lambda: _build(settings), work_dir=work / "scratch"), None
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from hmt_plugin.bench.quality_pretrained import hf_model_node, load_model, tokenizer_node

    node = hf_model_node(args, mode=settings["mode"], segment_length=settings["segment_length"],
                         bptt_depth=1, lora=False)
    model = load_model(node, final, final, work / "scratch", device=torch.device("cpu"),
                       dtype=torch.float32, seed=args.seed)
    return model, tt_config.instantiate(OmegaConf.create(tokenizer_node(args)))


def run_recall(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    eval_distances = args.eval_distances or args.distances
    # The table's figure and its chance level: per answer token for the token-level task; the
    # whole pass key for text, whose answer also holds predictable tokens (the space before it).
    metric, chance = (("exact_match", 10.0 ** -args.value_length) if args.backbone
                      else ("accuracy", 1 / args.num_symbols))
    results: Dict[str, Any] = {"runs": {}, "accuracy": {}, "metric": metric, "chance": chance,
                               "distances": eval_distances}
    for mode in args.modes:
        run_dir = work / "runs" / mode
        cfg = recipe_config(args, mode, run_dir, work)
        path = work / "runs" / f"{mode}.yaml"
        same = runs.same_config(cfg, path)
        runs.write_config(cfg, path)
        if args.reuse and same and runs.is_finished(run_dir):
            wall = None
        else:
            stderr(f"training {mode}: {args.steps} steps of {args.batch_size} documents")
            wall = runs.run_recipe(path, launcher=args.launcher, threads=args.threads)
        results["runs"][mode] = {
            "config": str(path), "wall_s": None if wall is None else round(wall, 1),
            "final_metrics": runs.last_metrics(run_dir / "logs"),
            "tokens_per_segment": cfg["dataset"]["tokens_per_segment"],
        }
    for mode in args.modes:
        model, tokenizer = load_run(args, work / "runs" / mode, work)
        reads = [(mode, mode)] + ([("hmt without recall", "hmt_stage1")] if mode == "hmt" else [])
        for label, read_mode in reads:
            stderr(f"evaluating {label} at distances {eval_distances}")
            results["accuracy"][label] = evaluate(model, args, read_mode, eval_distances,
                                                  tokenizer)
    return results


def tables(record: Dict[str, Any]) -> str:
    res = record["results"]
    labels = list(res["accuracy"])
    metric = res.get("metric", "accuracy")
    rows = [[int(d)] + [res["accuracy"][l][str(d)][metric] for l in labels]
            for d in res["distances"]]
    s = record["settings"]
    train_rows = [[m, r["tokens_per_segment"], r["wall_s"], r["final_metrics"].get("loss")]
                  for m, r in res["runs"].items()]
    return "\n".join([
        f"## recall\n\n{header(record)}\n",
        f"{'Exact pass keys' if metric == 'exact_match' else 'Answer accuracy'} by distance "
        f"in segments (chance {res['chance']:.3g}; "
        f"{s['eval_documents']} documents per distance; trained {s['steps']} steps x "
        f"{s['batch_size']} documents on distances {s['distances']}).\n",
        markdown_table(["distance (segments)"] + labels, rows), "",
        markdown_table(["run", "new tokens per segment", "wall s", "final loss (last 5 logs)"],
                       train_rows),
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hmt_plugin.bench recall",
        description="Synthetic long-range recall accuracy by distance for baseline, rmt, hmt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default=None,
                   help="a Hugging Face checkpoint directory to fine-tune (default: a random "
                        "tiny Llama trained from scratch on token ids)")
    p.add_argument("--modes", nargs="+", choices=["baseline", "rmt", "hmt_stage1", "hmt"],
                   default=list(MODELS), help="the models to train and read")
    p.add_argument("--distances", type=int, nargs="+", default=[0, 1, 2, 4, 8],
                   help="training distances (segments between needle and question)")
    p.add_argument("--eval_distances", type=int, nargs="+", default=None,
                   help="default: the training distances")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--segment_length", type=int, default=24)
    p.add_argument("--num_sensory", type=int, default=4)
    p.add_argument("--recall_hidden_dim", type=int, default=32)
    p.add_argument("--cache_size", type=int, default=16)
    p.add_argument("--num_symbols", type=int, default=8)
    p.add_argument("--needle_position", choices=["start", "random"], default="start")
    p.add_argument("--value_length", type=int, default=3,
                   help="with --backbone: digits in the pass key")
    p.add_argument("--memory_init", choices=MEMORY_INITS, default="mean_embedding",
                   help="with --backbone (HMTConfig.memory_init)")
    p.add_argument("--memory_sink", action="store_true",
                   help="with --backbone: a sink at position 0 of every memory segment")
    p.add_argument("--max_seq_len", type=int, default=2048,
                   help="with --backbone: its RoPE table, at least the segment length")
    p.add_argument("--eval_documents", type=int, default=256)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--work_dir", default="outputs/bench/recall")
    p.add_argument("--out", default=None, help="default: <work_dir>/recall.json")
    p.add_argument("--launcher", choices=runs.LAUNCHERS, default="subprocess")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep runs whose final checkpoint exists")
    p.add_argument("--quick", action="store_true", help="distances 0 1 2, 25 steps: about a minute")
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_quick(args, argv, QUICK, work_dir="outputs/bench/recall-quick")
    if min(args.distances) < 0:
        parser.error("--distances must be >= 0")
    if args.memory_sink and not args.backbone:
        parser.error("--memory_sink applies to a pretrained backbone: add --backbone DIR, or drop "
                     "it for the tiny random Llama.")
    if args.backbone:
        args.backbone = str(Path(args.backbone).expanduser())
        if not (Path(args.backbone) / "config.json").is_file():
            parser.error(f"--backbone {args.backbone} holds no config.json: point it at a Hugging "
                         "Face checkpoint directory (e.g. the one ../shared/tools/smollm2_135m.sh "
                         "prints).")
    # The quality benchmark's model node reads these; this benchmark keeps the published ones.
    args.memory_scale, args.score_scale = "published", "sqrt"
    if args.out is None:
        args.out = str(Path(args.work_dir) / "recall.json")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    run = BenchRun("recall", argv)
    results = run_recall(args)
    record = run.finish(args.out, tables, settings=vars(args), results=results,
                        machine=machine_info("cpu", "fp32"))
    return record
