"""Quality: perplexity by context length on held-out books for baseline, RMT and HMT trained
the same way from the same small backbone (the paper's Figures 2/3), and HMT with and
without memory recall (its Figure 8).

    python -m hmt_plugin.bench quality --books /path/to/gutenberg --num_eval_books 5
    python -m hmt_plugin.bench quality --train_books DIR --eval_books DIR
    python -m hmt_plugin.bench quality --books DIR --quick        # minutes, tiny, a smoke run

Steps (each a real run of the fine-tuning recipe on a config generated in ``--work_dir``):

1. Split the books (seeded) into a training folder and a held-out folder (symlinks), unless
   two folders are given; the held-out books are never seen by any training step.
2. Train a SentencePiece tokenizer on the training books (or use ``--tokenizer``).
3. Pretrain a small Llama from random weights: the recipe in ``baseline`` mode (the backbone
   alone on ``--pretrain_seq_len``-token windows, loss on every token), full fine-tune, for
   the number of steps that fits ``--pretrain_minutes`` (measured on this machine first).
4. From the pretrained backbone, at one ``--segment_length``, with the same number of
   optimizer steps, batch and windows: ``baseline`` (segments read alone), ``rmt`` (memory
   embedding carried) and HMT in two stages, ``hmt_stage1`` (memory + sensory tokens) for
   ``--stage1_fraction`` of the steps, then ``hmt`` (recall added) for the rest.
5. Read the held-out books (cut into pieces of ``--max_eval_tokens`` tokens) with each model
   and score the last segment after T tokens of context, for each T in
   ``--context_lengths`` (:func:`hmt_plugin.eval.long_context.evaluate_long_context`), plus
   the PPL of every token of the pieces. The stage-2 weights are also read in
   ``hmt_stage1`` mode: the same model without recall.
"""

import argparse
import dataclasses
import json
import os
import random
import sys
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
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
from hmt_plugin.training.checkpoints import latest_checkpoint

# A Books-Llama-5M-sized backbone (4 layers, d=256) and its settings; --quick shrinks all of it.
DEFAULTS = dict(
    vocab_size=4096, embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=8,
    intermediate_dim=688, pretrain_seq_len=256, pretrain_batch_size=16, pretrain_lr=1e-3,
    pretrain_minutes=45.0, segment_length=128, num_sensory=16, recall_hidden_dim=128,
    cache_size=300, bptt_depth=3, finetune_batch_size=4, finetune_lr=1e-4,
    finetune_minutes=8.0, context_lengths=[256, 1024, 4096, 16384], max_eval_tokens=16384,
    pieces_per_book=4, eval_batch_size=4, sentencepiece_sentences=400_000,
)
QUICK = dict(
    vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4,
    intermediate_dim=128, pretrain_seq_len=64, pretrain_batch_size=8, pretrain_steps=30,
    segment_length=32, num_sensory=4, recall_hidden_dim=32, cache_size=32, bptt_depth=2,
    finetune_batch_size=4, finetune_steps=12, context_lengths=[64, 256, 1024],
    max_eval_tokens=1024, pieces_per_book=2, num_train_books=3, num_eval_books=2,
    sentencepiece_sentences=20_000,
)
DIMS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "intermediate_dim")


# ---------------------------------------------------------------------------- data
def split_books(args: argparse.Namespace, work: Path) -> Tuple[Path, Path, Dict[str, Any]]:
    """The training and held-out folders: given, or a seeded split of ``--books`` into two
    folders of symlinks under ``work/data``. Overlap between them is refused."""
    if args.books and not (args.train_books or args.eval_books):
        source = Path(args.books).expanduser()
        if not source.is_dir():
            raise SystemExit(f"--books {source} is not a directory of .txt books.")
        files = sorted(p for p in source.glob("*.txt") if p.is_file())
        need = args.num_eval_books + (args.num_train_books or 1)
        if len(files) < need:
            raise SystemExit(f"--books {source} holds {len(files)} .txt files; need {need}.")
        order = list(files)
        random.Random(args.split_seed).shuffle(order)
        held_out = sorted(order[: args.num_eval_books])
        rest = order[args.num_eval_books :]
        train = sorted(rest[: args.num_train_books] if args.num_train_books else rest)
        train_dir, eval_dir = work / "data" / "train", work / "data" / "eval"
        for folder, chosen in ((train_dir, train), (eval_dir, held_out)):
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
            for f in chosen:
                (folder / f.name).symlink_to(f.resolve())
    else:
        if not (args.train_books and args.eval_books):
            raise SystemExit("give --books DIR (split here) or both --train_books and --eval_books.")
        train_dir, eval_dir = Path(args.train_books).expanduser(), Path(args.eval_books).expanduser()
        for flag, folder in (("--train_books", train_dir), ("--eval_books", eval_dir)):
            if not folder.is_dir():
                raise SystemExit(f"{flag} {folder} is not a directory.")
    train_files = sorted(train_dir.rglob("*.txt"))
    eval_files = sorted(eval_dir.rglob("*.txt"))
    if not train_files or not eval_files:
        raise SystemExit(f"no .txt files in {train_dir if not train_files else eval_dir}.")
    overlap = {f.resolve() for f in train_files} & {f.resolve() for f in eval_files}
    same_name = {f.name for f in train_files} & {f.name for f in eval_files}
    if overlap or same_name:
        raise SystemExit(f"held-out books are also training books: {sorted(map(str, overlap or same_name))}")
    info = {
        "train_dir": str(train_dir), "eval_dir": str(eval_dir),
        "train_books": [f.name for f in train_files], "eval_books": [f.name for f in eval_files],
        "split_seed": args.split_seed if args.books else None,
    }
    return train_dir, eval_dir, info


def train_tokenizer(train_dir: Path, out_dir: Path, vocab_size: int, max_sentences: int) -> Path:
    """A SentencePiece BPE model (Llama 2 layout: unk 0, bos 1, eos 2, no pad) trained on the
    training books only, Gutenberg boilerplate removed."""
    import sentencepiece as spm

    from hmt_plugin.data.gutenberg import strip_gutenberg

    model = out_dir / "tokenizer.model"
    books = sorted(train_dir.rglob("*.txt"))
    recipe = {"books": [b.name for b in books], "vocab_size": vocab_size,
              "max_sentences": max_sentences}
    stamp = out_dir / "trained_on.json"
    if model.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return model  # the same books and settings: reuse
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for book in books:
            text = strip_gutenberg(book.read_text(encoding="utf-8-sig"))
            for paragraph in text.split("\n\n"):
                line = " ".join(paragraph.split())
                # SentencePiece drops lines over 4192 bytes: a text without blank lines
                # between paragraphs goes in line by line instead.
                lines = [line] if len(line) < 4000 else paragraph.splitlines()
                f.writelines(x.strip() + "\n" for x in lines if x.strip())
    stderr(f"training a {vocab_size}-piece SentencePiece tokenizer on {train_dir}")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=max(1, len(os.sched_getaffinity(0))), minloglevel=2,
    )
    corpus.unlink()
    stamp.write_text(json.dumps(recipe))
    return model


def load_books(tokenizer_path: Path, folder: Path, cache_dir: Path):
    from torchtune.models.llama2 import llama2_tokenizer

    from hmt_plugin.data import long_text_dataset

    tok = llama2_tokenizer(str(tokenizer_path))
    return long_text_dataset(tok, str(folder), strip_gutenberg=True, cache_dir=str(cache_dir),
                             progress=False)


def eval_pieces(documents, piece_tokens: int, pieces_per_book: int) -> List[np.ndarray]:
    """Consecutive, non-overlapping pieces of ``piece_tokens`` tokens from the start of each
    held-out book (up to ``pieces_per_book``; a shorter book gives itself). Each piece is read
    from a fresh state, so every piece is a sample of "T tokens of context" for each T."""
    pieces = []
    for i in range(len(documents)):
        tokens = np.asarray(documents.document_tokens(i))
        n = min(pieces_per_book, max(1, len(tokens) // piece_tokens))
        pieces.extend(tokens[k * piece_tokens : (k + 1) * piece_tokens] for k in range(n))
    return pieces


# ---------------------------------------------------------------------------- configs
def dims_of(args) -> Dict[str, int]:
    return {k: getattr(args, k) for k in DIMS}


def model_node(args, *, mode: str, segment_length: int, max_seq_len: int, bptt_depth: int) -> Dict[str, Any]:
    return {
        "_component_": "hmt_plugin.models.hmt_tiny", **dims_of(args), "max_seq_len": max_seq_len,
        "mode": mode, "segment_length": segment_length, "num_sensory": args.num_sensory,
        "sum_fraction": args.sum_fraction, "recall_hidden_dim": args.recall_hidden_dim,
        "cache_size": args.cache_size, "bptt_depth": bptt_depth,
    }


def recipe_config(
    args, *, run_dir: Path, model: Dict[str, Any], checkpointer: Dict[str, Any],
    hmt_checkpoint: Optional[Path], train_dir: Path, tokenizer: Path, cache_dir: Path,
    steps: Dict[str, int], total_steps: int, batch_size: int, lr: float, loss_scope: str,
    windows: Dict[str, Any],
) -> Dict[str, Any]:
    return {
        "output_dir": str(run_dir), "seed": args.seed, "device": "cpu", "dtype": "fp32",
        "model": model, "checkpointer": checkpointer,
        "hmt_checkpoint": str(hmt_checkpoint) if hmt_checkpoint else None,
        "resume_from_checkpoint": False,
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer", "path": str(tokenizer)},
        "dataset": {"_component_": "hmt_plugin.data.long_text_dataset", "source": str(train_dir),
                    "strip_gutenberg": True, "cache_dir": str(cache_dir), "progress": False},
        "windows": windows, "collate_fn": "hmt_plugin.data.segment_collate", "shuffle": True,
        "batch_size": batch_size, "loss_scope": loss_scope,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": lr, "weight_decay": 0.0},
        "lr_scheduler": runs.cosine_schedule(total_steps), **steps,
        "gradient_accumulation_steps": 1, "clip_grad_norm": 1.0, "compile": False,
        "enable_activation_checkpointing": False,
        "metric_logger": runs.disk_logger(run_dir / "logs"),
        "log_every_n_steps": 5, "save_every_n_steps": max(1, total_steps // 3),
        "keep_last_n_checkpoints": 1,
    }


def build(args, settings: Dict[str, Any], max_seq_len: int):
    from hmt_plugin.models import hmt_tiny

    return partial(hmt_tiny, **dims_of(args), max_seq_len=max_seq_len, **settings)


def budget_steps(args, kind: str, build_model, batch: int, window: int, lr: float) -> Tuple[int, float]:
    """(steps, measured seconds per step): explicit ``--<kind>_steps``, or as many as fit in
    ``--<kind>_minutes`` at the speed measured here (a few steps of the real model).

    The plan is kept in ``<work_dir>/runs/budget.json``: with ``--reuse`` an earlier plan is
    taken as it was, so a re-measured speed cannot change the configs and force finished or
    interrupted runs to start over.
    """
    plan_path = Path(args.work_dir) / "runs" / "budget.json"
    plans = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    explicit = getattr(args, f"{kind}_steps")
    earlier = plans.get(kind)
    if args.reuse and earlier and (not explicit or earlier["steps"] == int(explicit)):
        return int(earlier["steps"]), float(earlier["seconds_per_step"])
    per_step = runs.seconds_per_step(build_model, batch, window, lr)
    if explicit:
        steps = int(explicit)
    else:
        minutes = getattr(args, f"{kind}_minutes")
        # The recipe also loads data and logs; 10% covers it on the machines we tried.
        steps = max(1, int(minutes * 60 / (per_step * 1.1)))
    plans[kind] = {"steps": steps, "seconds_per_step": per_step}
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plans, indent=1))
    return steps, per_step


# ---------------------------------------------------------------------------- the benchmark
def run_quality(args: argparse.Namespace) -> Dict[str, Any]:
    from hmt_plugin.data import SegmentWindows
    from hmt_plugin.eval.long_context import evaluate_long_context

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "token_cache"
    os.environ["HMT_CACHE_DIR"] = str(cache)
    results: Dict[str, Any] = {"runs": {}}
    train_dir, eval_dir, results["data"] = split_books(args, work)
    tokenizer = Path(args.tokenizer) if args.tokenizer else train_tokenizer(
        train_dir, work / "tokenizer", args.vocab_size, args.sentencepiece_sentences)
    results["tokenizer"] = str(tokenizer)
    train_docs = load_books(tokenizer, train_dir, cache)
    results["data"]["train_tokens"] = int(train_docs.num_tokens)
    launch = dict(launcher=args.launcher, threads=args.threads, cache_dir=cache)
    S = args.pretrain_seq_len

    # ---- 3. pretraining from random weights
    pre_dir = work / "runs" / "pretrain"
    pre_settings = dict(mode="baseline", segment_length=S, bptt_depth=1)
    pre_build = build(args, pre_settings, S)
    steps, per_step = budget_steps(args, "pretrain", pre_build, args.pretrain_batch_size, S, args.pretrain_lr)
    windows = len(SegmentWindows(train_docs, tokens_per_segment=S, segments_per_window=1))
    sched = runs.schedule(steps, windows // args.pretrain_batch_size)
    cfg = recipe_config(
        args, run_dir=pre_dir, model=model_node(args, **pre_settings, max_seq_len=S),
        checkpointer={
            "_component_": "hmt_plugin.checkpointing.tiny_llama_checkpointer",
            "checkpoint_dir": str(work / "runs" / "random_init"), "output_dir": str(pre_dir),
            **dims_of(args), "max_seq_len": S, "seed": args.seed,
        },
        hmt_checkpoint=None, train_dir=train_dir, tokenizer=tokenizer, cache_dir=cache,
        steps=sched, total_steps=steps, batch_size=args.pretrain_batch_size, lr=args.pretrain_lr,
        loss_scope="all", windows={"segments_per_window": 1, "random_offset": True},
    )
    results["runs"]["pretrain"] = train_run(args, "pretrain", pre_dir, cfg, launch, steps, per_step,
                                         tokens_per_step=args.pretrain_batch_size * S)

    # ---- 4. fine-tuning at one segment length, equal step budgets
    L = args.segment_length
    # Every mode reads HMT's new tokens per segment (in a shorter backbone call without
    # sensory tokens or memory), so the models differ only in memory.
    seg = equal_segment_lengths(args.segment_length, args.num_sensory)
    from_pretrained = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(runs.final_dir(pre_dir)), "checkpoint_files": [runs.FINAL_WEIGHTS],
        "model_type": "LLAMA3",
    }
    hmt_build = build(args, dict(mode="hmt", segment_length=L, num_sensory=args.num_sensory,
                                 sum_fraction=args.sum_fraction, recall_hidden_dim=args.recall_hidden_dim,
                                 cache_size=args.cache_size, bptt_depth=args.bptt_depth), S)
    # The budget is set by HMT, the slowest per step; every model gets the same steps.
    hmt_window = args.bptt_depth * hmt_build().config.tokens_per_segment
    ft_steps, ft_per_step = budget_steps(args, "finetune", hmt_build, args.finetune_batch_size,
                                         hmt_window, args.finetune_lr)
    stage1_steps = max(1, round(ft_steps * args.stage1_fraction))
    plan = [
        ("baseline", "baseline", ft_steps, None),
        ("rmt", "rmt", ft_steps, None),
        ("hmt_stage1", "hmt_stage1", stage1_steps, None),
        ("hmt", "hmt", max(1, ft_steps - stage1_steps), "hmt_stage1"),
    ]
    for name, mode, n_steps, start_from in plan:
        run_dir = work / "runs" / name
        model = model_node(args, mode=mode, segment_length=seg[mode], max_seq_len=S,
                           bptt_depth=args.bptt_depth)
        tps = _tokens_per_segment(model)
        n_windows = len(SegmentWindows(train_docs, tokens_per_segment=tps,
                                       segments_per_window=args.bptt_depth))
        checkpointer = dict(from_pretrained, output_dir=str(run_dir))
        previous = None
        if start_from:
            previous = runs.final_dir(work / "runs" / start_from)
            checkpointer["checkpoint_dir"] = str(previous)
        cfg = recipe_config(
            args, run_dir=run_dir, model=model, checkpointer=checkpointer, hmt_checkpoint=previous,
            train_dir=train_dir, tokenizer=tokenizer, cache_dir=cache,
            steps=runs.schedule(n_steps, n_windows // args.finetune_batch_size),
            total_steps=n_steps, batch_size=args.finetune_batch_size, lr=args.finetune_lr,
            loss_scope=args.loss_scope, windows={"random_offset": True},
        )
        results["runs"][name] = train_run(args, name, run_dir, cfg, launch, n_steps, None,
                                       tokens_per_step=args.finetune_batch_size * args.bptt_depth * tps)
    results["runs"]["finetune_seconds_per_step_hmt_measured"] = round(ft_per_step, 4)

    # ---- 5. evaluation on held-out books
    eval_docs = load_books(tokenizer, eval_dir, cache)
    pieces = eval_pieces(eval_docs, args.max_eval_tokens, args.pieces_per_book)
    results["data"]["eval_pieces"] = len(pieces)
    results["data"]["eval_piece_tokens"] = [int(len(p)) for p in pieces]
    ts = [t for t in args.context_lengths if t <= max(len(p) for p in pieces)]
    readers = [
        # label, run, mode to read in, settings to build with
        ("pretrained backbone (no memory)", "pretrain", "baseline",
         dict(mode="baseline", segment_length=seg["baseline"])),
        ("baseline", "baseline", "baseline", None),
        ("rmt", "rmt", "rmt", None),
        ("hmt stage 1", "hmt_stage1", "hmt_stage1", None),
        ("hmt", "hmt", "hmt", None),
        ("hmt without recall", "hmt", "hmt_stage1", None),
    ]
    scores, read_at = {}, {}
    for label, run_name, mode, settings in readers:
        final = runs.final_dir(work / "runs" / run_name)
        settings = settings or runs.hmt_settings_from(final)
        model = runs.load_trained(final, build(args, settings, S), work_dir=work / "scratch")
        # Each mode holds a different number of new tokens per segment; T cut to whole
        # segments makes every mode score a full last segment, not a few tokens at the start
        # of one (where any model does worst), at a T within one segment of the nominal one.
        tps = dataclasses.replace(model.config, mode=mode).tokens_per_segment
        read_at[label] = {t: max(tps, t - t % tps) for t in ts}
        stderr(f"evaluating {label} ({len(pieces)} pieces, T = {list(read_at[label].values())})")
        result = evaluate_long_context(
            model, pieces, context_lengths=list(read_at[label].values()), mode=mode,
            label=label, batch_size=args.eval_batch_size, chunk_segments=args.chunk_segments,
            document_ppl=True, memory="none",
        )
        scores[label] = result.to_dict()
    results["eval"] = scores
    results["context_lengths"] = ts
    results["context_lengths_read"] = {label: list(m.values()) for label, m in read_at.items()}
    return results


def equal_segment_lengths(segment_length: int, num_sensory: int,
                          memory_sink: bool = False) -> Dict[str, int]:
    """Per mode, the ``segment_length`` at which it reads as many new tokens per segment as
    HMT at ``segment_length`` with ``num_sensory`` sensory tokens in the published layout
    (with ``memory_sink`` the memory modes' calls hold the sink besides)."""
    from hmt_plugin.modules.hmt_config import HMTConfig

    hmt = HMTConfig(mode="hmt", segment_length=segment_length, num_sensory=num_sensory)
    if memory_sink:
        hmt = HMTConfig(mode="hmt", segment_length=segment_length + 1, num_sensory=num_sensory,
                        memory_sink=True)
    return {mode: hmt.with_mode(mode, keep_tokens_per_segment=True).segment_length
            for mode in ("baseline", "rmt", "hmt_stage1", "hmt")}


def _tokens_per_segment(model_node: Dict[str, Any]) -> int:
    from hmt_plugin.modules.hmt_config import HMTConfig

    keys = ("segment_length", "mode", "num_sensory", "sum_fraction", "recall_hidden_dim",
            "cache_size", "bptt_depth")
    return HMTConfig(**{k: model_node[k] for k in keys}).tokens_per_segment


def train_run(args, name, run_dir, cfg, launch, steps, per_step, tokens_per_step) -> Dict[str, Any]:
    config_path = run_dir.parent / f"{name}.yaml"
    same = runs.same_config(cfg, config_path)
    runs.write_config(cfg, config_path)
    resumed_from = None
    if args.reuse and same and runs.is_finished(run_dir):
        stderr(f"{name}: reusing {runs.final_dir(run_dir)}")
        wall = None
    elif args.reuse and same and latest_checkpoint(run_dir) is not None:
        # An interrupted run: continue it through the recipe's own resume, which replays the
        # data order and LR schedule exactly, instead of starting over.
        resumed_from = latest_checkpoint(run_dir)
        stderr(f"{name}: resuming from {resumed_from}")
        resume_path = runs.write_config({**cfg, "resume_from_checkpoint": True},
                                        run_dir.parent / f"{name}.resume.yaml")
        wall = runs.run_recipe(resume_path, **launch)
    else:
        stderr(f"{name}: {steps} steps"
               + (f" (measured {per_step:.3f} s/step)" if per_step else ""))
        wall = runs.run_recipe(config_path, **launch)
    metrics = runs.last_metrics(run_dir / "logs")
    return {
        "config": str(config_path), "steps": steps, "epochs": cfg["epochs"],
        "tokens_per_step": tokens_per_step, "wall_s": None if wall is None else round(wall, 1),
        "seconds_per_step_measured": None if per_step is None else round(per_step, 4),
        # wall_s covers only the resumed part of an interrupted run
        "resumed_from": None if resumed_from is None else resumed_from.name,
        "final_metrics": metrics,
    }


# ---------------------------------------------------------------------------- output
def tables(record: Dict[str, Any]) -> str:
    res = record["results"]
    scores, ts = res["eval"], res["context_lengths"]
    labels = list(scores)
    data = res["data"]
    out = [f"## quality\n\n{header(record)}\n",
           f"Trained on {len(data['train_books'])} books ({data['train_tokens']:,} tokens); "
           f"evaluated on {len(data['eval_books'])} held-out books "
           f"({', '.join(data['eval_books'])}), {data['eval_pieces']} pieces.\n"]
    read_at = res.get("context_lengths_read") or {label: ts for label in labels}

    def score_at(label: str, i: int) -> Optional[Dict[str, Any]]:
        t = read_at[label][i]
        s = next((c for c in scores[label]["context"] if c["context_length"] == t), None)
        return s if s and s["tokens"] else None

    rows = []
    for i, t in enumerate(ts):
        row = [t]
        for label in labels:
            s = score_at(label, i)
            row.append(s["ppl"] if s else None)
        rows.append(row)
    rows.append(["all tokens"] + [scores[l]["document"]["ppl"] for l in labels])
    out.append("### Last-segment perplexity after T tokens of context (lower is better)\n")
    out.append("Each mode reads T cut to a whole number of its own segments "
               "(`context_lengths_read` in the JSON), so each scores a full last segment.\n")
    out.append(markdown_table(["T"] + labels, rows))
    runs_info = res["runs"]
    train_rows = [[name, r["steps"], r["tokens_per_step"], r["wall_s"],
                   r["final_metrics"].get("loss")]
                  for name, r in runs_info.items() if isinstance(r, dict)]
    out.append("\n### Training runs\n")
    out.append(markdown_table(["run", "steps", "tokens/step", "wall s", "final loss (last 5 logs)"],
                              train_rows))
    if "hmt" in scores and "hmt without recall" in scores:
        rows = []
        for i, t in enumerate(ts):
            with_r, without = score_at("hmt", i), score_at("hmt without recall", i)
            if with_r and without:
                rows.append([t, with_r["ppl"], without["ppl"],
                             100 * (without["ppl"] - with_r["ppl"]) / with_r["ppl"]])
        out.append("\n### Memory recall ablation: the stage-2 HMT weights read with and without recall\n")
        out.append(markdown_table(["T", "HMT", "HMT without recall", "PPL increase without recall %"], rows))
    return "\n".join(out)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hmt_plugin.bench quality",
        description="Pretrain a small Llama on books, fine-tune baseline / rmt / hmt (two "
                    "stages) the same way, and compare perplexity by context length on "
                    "held-out books, with the recall ablation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("books")
    g.add_argument("--books", help="a folder of .txt books, split here into train / held out")
    g.add_argument("--num_eval_books", type=int, default=5)
    g.add_argument("--num_train_books", type=int, default=None, help="default: all the others")
    g.add_argument("--split_seed", type=int, default=0)
    g.add_argument("--train_books", help="a folder of training books (with --eval_books)")
    g.add_argument("--eval_books", help="a folder of held-out books, none of them in --train_books")
    g.add_argument("--tokenizer", help="a SentencePiece .model; default: trained on the training books")

    g = p.add_argument_group("backbone and pretraining")
    for name in DIMS:
        g.add_argument(f"--{name}", type=int, default=DEFAULTS[name])
    g.add_argument("--pretrain_seq_len", type=int, default=DEFAULTS["pretrain_seq_len"])
    g.add_argument("--pretrain_batch_size", type=int, default=DEFAULTS["pretrain_batch_size"])
    g.add_argument("--pretrain_lr", type=float, default=DEFAULTS["pretrain_lr"])
    g.add_argument("--pretrain_minutes", type=float, default=DEFAULTS["pretrain_minutes"],
                   help="time box, converted to steps at the speed measured here")
    g.add_argument("--pretrain_steps", type=int, default=None, help="overrides --pretrain_minutes")

    g = p.add_argument_group("fine-tuning (the same budget for every model)")
    g.add_argument("--segment_length", type=int, default=DEFAULTS["segment_length"])
    g.add_argument("--num_sensory", type=int, default=DEFAULTS["num_sensory"])
    g.add_argument("--sum_fraction", type=float, default=0.5)
    g.add_argument("--recall_hidden_dim", type=int, default=DEFAULTS["recall_hidden_dim"])
    g.add_argument("--cache_size", type=int, default=DEFAULTS["cache_size"])
    g.add_argument("--bptt_depth", type=int, default=DEFAULTS["bptt_depth"])
    g.add_argument("--finetune_batch_size", type=int, default=DEFAULTS["finetune_batch_size"])
    g.add_argument("--finetune_lr", type=float, default=DEFAULTS["finetune_lr"])
    g.add_argument("--finetune_minutes", type=float, default=DEFAULTS["finetune_minutes"],
                   help="per model, converted to steps at HMT's measured speed")
    g.add_argument("--finetune_steps", type=int, default=None, help="overrides --finetune_minutes")
    g.add_argument("--stage1_fraction", type=float, default=0.5,
                   help="share of HMT's steps spent in stage 1 (the rest in stage 2)")
    g.add_argument("--loss_scope", choices=["last", "all"], default="last")

    g = p.add_argument_group("evaluation")
    g.add_argument("--context_lengths", type=int, nargs="+", default=DEFAULTS["context_lengths"])
    g.add_argument("--max_eval_tokens", type=int, default=DEFAULTS["max_eval_tokens"],
                   help="tokens per held-out piece")
    g.add_argument("--pieces_per_book", type=int, default=DEFAULTS["pieces_per_book"])
    g.add_argument("--eval_batch_size", type=int, default=DEFAULTS["eval_batch_size"])
    g.add_argument("--chunk_segments", type=int, default=16)

    g = p.add_argument_group("run")
    g.add_argument("--work_dir", default="outputs/bench/quality")
    g.add_argument("--out", default=None, help="JSON result (default: <work_dir>/quality.json)")
    g.add_argument("--launcher", choices=runs.LAUNCHERS, default="subprocess")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--reuse", action="store_true",
                   help="keep runs whose config is unchanged and whose final checkpoint exists "
                        "(resume an interrupted benchmark; give --pretrain_steps and "
                        "--finetune_steps, since time boxes are re-measured on every call)")
    g.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: minutes")
    p.add_argument("--sentencepiece_sentences", type=int, default=DEFAULTS["sentencepiece_sentences"])
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_quick(args, argv, QUICK, work_dir="outputs/bench/quality-quick")
    if not 0 < args.stage1_fraction < 1:
        parser.error("--stage1_fraction must be in (0, 1)")
    if args.segment_length > args.pretrain_seq_len:
        parser.error("--segment_length must not exceed --pretrain_seq_len (the backbone's max_seq_len)")
    if args.out is None:
        args.out = str(Path(args.work_dir) / "quality.json")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--backbone" or a.startswith("--backbone=") for a in argv):
        # A pretrained backbone given by directory: no pretraining step (quality_pretrained).
        from hmt_plugin.bench import quality_pretrained

        return quality_pretrained.main(argv)
    args = parse(argv)
    run = BenchRun("quality", argv)
    results = run_quality(args)
    record = run.finish(args.out, tables, settings=vars(args), results=results,
                        machine=machine_info("cpu", "fp32"))
    for png in write_plots(record, Path(args.out).parent):
        print(f"Wrote {png}")
    return record


def write_plots(record: Dict[str, Any], out_dir: Path) -> List[Path]:
    """``quality_ppl_vs_context.png`` (every reader) and ``quality_recall_distance.png``
    (the HMT reader's recalls) from a quality record, as ``hmt_eval`` draws them."""
    from hmt_plugin.eval.long_context import LongContextResult
    from hmt_plugin.eval.plots import plot_ppl_vs_context, plot_recall_distance

    results = [LongContextResult.from_dict(r) for r in record["results"]["eval"].values()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        plot_ppl_vs_context(results, out_dir / "quality_ppl_vs_context.png"),
        plot_recall_distance([r for r in results if r.label == "hmt"],
                             out_dir / "quality_recall_distance.png"),
    ]
    return [p for p in written if p is not None]
