"""Quality on a real pretrained backbone: does HMT read held-out books better than the same
backbone with no memory, with a sliding window, and than RMT, after the same fine-tuning?

    python -m hmt_plugin.bench quality --backbone ~/.cache/hmt_backbones/smollm2-135m
    python -m hmt_plugin.bench quality --backbone DIR --device cuda      # bf16, one GPU
    python -m hmt_plugin.bench quality --backbone DIR --quick            # minutes, a smoke run

``--backbone`` is any Hugging Face checkpoint directory the project covers
(:func:`hmt_plugin.models.hf_backbone`); its ``tokenizer.json`` tokenizes the books.

Steps:

1. Books: ``--train_books`` / ``--eval_books``, or a seeded split of ``--books`` (default:
   ``../shared/data/gutenberg``); no held-out book is ever read by a training step.
2. Fine-tuning, each a real run of the ``hmt_finetune_single_device`` recipe on a config
   written to ``<work_dir>/runs``, all from the same backbone, with the same optimizer,
   learning rate and number of training tokens:

   * ``no_memory``: the backbone alone (``baseline`` mode) on segments of the same new
     tokens as HMT's (it serves both no-memory readers below);
   * ``rmt``: the memory embedding carried, no sensory tokens, the same new tokens;
   * ``hmt_stage1``: sensory tokens and carried memory, ``--stage1_segments`` per window;
   * ``hmt``: stage 2, recall on, from stage 1's weights, ``--stage2_segments`` per window
     (long enough for the cache to hold memories to choose from);
   * ``full_context``: the backbone alone on windows as long as a held-out piece, the upper
     bound fine-tuned like the others (in the ``cuda`` and ``quick`` presets; on 2 CPU cores
     it adds about 20 minutes, so there it runs only when ``--runs`` names it).

3. Every reader scores the same tokens of the same held-out pieces (``--eval_tokens`` tokens,
   whole segments, from ``--eval_skip`` tokens into each book), position by position
   (:mod:`hmt_plugin.eval.token_nll`): the untuned backbone in pieces of the new tokens, with a
   sliding window as long as HMT's backbone call, and with the whole piece in context (the
   upper bound); the untuned HMT stage 1 (both memory initialisations: the step-0 check);
   and each fine-tuned model, the stage-2 model also with recall switched off, and the
   full-context arm with the whole piece in context.

Per-reader NLL arrays are kept in ``<work_dir>/eval``, and runs in ``<work_dir>/runs``: an
interrupted benchmark continues where it stopped when called again with ``--reuse``.
"""

import argparse
import copy
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hmt_plugin.bench import runs
from hmt_plugin.bench.report import (
    BenchRun,
    header,
    machine_info,
    markdown_table,
    stderr,

)
from hmt_plugin.bench.quality import equal_segment_lengths, split_books, train_run
from hmt_plugin.modules.hmt_config import MEMORY_INITS, MEMORY_SCALES, SCORE_SCALES

SHARED_BOOKS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gutenberg"

# Sizes by device; a flag given on the command line wins over them.
PRESETS = {
    "cpu": dict(
        dtype="fp32", batch_size=1, full_context_batch_size=1, stage1_segments=4,
        stage2_segments=8, stage1_steps=60, stage2_steps=24, eval_segments=18, pieces_per_book=1,
        eval_batch_size=2, threads=2,
        runs=["no_memory", "rmt", "hmt_stage1", "hmt"],
    ),
    # Sized from the steps measured on one H200 (README, "The GPU size"): at batch 8 a step
    # costs about the same whatever the batch (eager kernel launches, not arithmetic, bound
    # it), so the batch is 32; the full-context arm stays at 8 (its [batch, 7992, vocab]
    # logits would not fit at 32) and takes 4x the steps for the same tokens.
    "cuda": dict(
        dtype="bf16", batch_size=32, full_context_batch_size=8, stage1_segments=4,
        stage2_segments=15, stage1_steps=32, stage2_steps=12, eval_segments=36,
        pieces_per_book=4, eval_batch_size=24, threads=None,
        runs=["no_memory", "rmt", "hmt_stage1", "hmt", "full_context"],
    ),
    "quick": dict(
        dtype="fp32", batch_size=2, full_context_batch_size=1, stage1_segments=2,
        stage2_segments=3, stage1_steps=2, stage2_steps=2, eval_segments=4, pieces_per_book=1,
        eval_batch_size=2, threads=None,
        num_eval_books=2, num_train_books=2, eval_skip=0, segment_length=48, num_sensory=8,
        cache_size=16, work_dir="outputs/bench/quality-pretrained-quick",
        runs=["no_memory", "rmt", "hmt_stage1", "hmt", "full_context"],
    ),
}

# The fine-tuning runs, in order, and the mode each trains in.
RUN_MODES = {"no_memory": "baseline", "rmt": "rmt", "hmt_stage1": "hmt_stage1", "hmt": "hmt",
             "full_context": "baseline"}
RUNS = tuple(RUN_MODES)

# reader label -> (run it reads, how it reads); "run" None is the untuned backbone.
READERS = [
    ("no memory (untuned)", None, "pieces"),
    ("sliding window (untuned)", None, "sliding"),
    ("full context (untuned)", None, "full"),
    ("hmt stage 1, step 0, published init", None, "hmt_stage1:published"),
    ("hmt stage 1, step 0, mean-embedding init", None, "hmt_stage1:mean_embedding"),
    ("no memory", "no_memory", "pieces"),
    ("sliding window", "no_memory", "sliding"),
    ("rmt", "rmt", "rmt"),
    ("hmt stage 1", "hmt_stage1", "hmt_stage1"),
    ("hmt", "hmt", "hmt"),
    ("hmt, recall off", "hmt", "hmt_stage1"),
    # Each HMT backbone with no memory at all, in the sliding window: what HMT's fine-tune
    # did to the backbone as a plain reader, apart from what its memory adds.
    ("sliding window, hmt stage 1 backbone", "hmt_stage1", "sliding"),
    ("sliding window, hmt backbone", "hmt", "sliding"),
    ("full context", "full_context", "full"),
]


# ---------------------------------------------------------------------------- settings
class Settings:
    """The benchmark's sizes, derived once from the arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        from hmt_plugin.modules.hmt_config import HMTConfig

        self.args = args
        hmt = HMTConfig(mode="hmt", segment_length=args.segment_length,
                        num_sensory=args.num_sensory, cache_size=args.cache_size)
        self.new_tokens = hmt.tokens_per_segment
        # Equal new tokens per segment in every mode: only memory differs between the arms.
        self.segment_length = equal_segment_lengths(args.segment_length, args.num_sensory,
                                                    args.memory_sink)
        # The cheap alternative reads as many positions as HMT's call in the published layout
        # (new tokens, sensory and memory; a sink would add a position of no information).
        self.sliding_window = equal_segment_lengths(args.segment_length, args.num_sensory)["hmt"]
        self.eval_tokens = args.eval_segments * self.new_tokens
        # Every arm trains on the same number of tokens: HMT's two stages together (the
        # single-stage arms in whole steps of stage-1 windows, so within half a step of it).
        self.train_tokens = self.new_tokens * args.batch_size * (
            args.stage1_segments * args.stage1_steps + args.stage2_segments * args.stage2_steps
        )
        per_step = self.new_tokens * args.batch_size * args.stage1_segments
        self.single_stage_steps = max(1, round(self.train_tokens / per_step))
        # The full-context arm trains on windows of a held-out piece's length (each book's
        # last window may be shorter, so this arm may read a little less than it counts).
        self.full_context_steps = max(
            1, round(self.train_tokens / (self.run_batch_size("full_context") * self.eval_tokens)))

    def run_batch_size(self, run: str) -> int:
        """Windows per step: the full-context arm's own (its windows are a whole piece long)."""
        return self.args.full_context_batch_size if run == "full_context" else self.args.batch_size

    def run_segment_length(self, run: str) -> int:
        """The ``segment_length`` a run trains (and its weights are read) with: one held-out
        piece for the full-context arm, else its mode's (equal new tokens per segment)."""
        return self.eval_tokens if run == "full_context" else self.segment_length[RUN_MODES[run]]


def hf_model_node(args, *, mode: str, segment_length: int, bptt_depth: int,
                  lora: bool) -> Dict[str, Any]:
    backbone: Dict[str, Any] = {"_component_": "hmt_plugin.models.hf_backbone",
                                "checkpoint_dir": str(args.backbone),
                                "max_seq_len": args.max_seq_len}
    if lora:
        backbone.update(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                        apply_lora_to_mlp=True, lora_rank=args.lora_rank,
                        lora_alpha=2 * args.lora_rank)
    return {
        "_component_": "hmt_plugin.models.hmt", "backbone": backbone, "mode": mode,
        "segment_length": segment_length, "num_sensory": args.num_sensory,
        "sum_fraction": 0.5, "cache_size": args.cache_size, "bptt_depth": bptt_depth,
        "memory_init": args.memory_init,
        # Named only where they change the model (a memory mode) and leave the published
        # function, so runs they do not change keep their configs (and --reuse keeps them).
        **({"memory_scale": args.memory_scale}
           if mode != "baseline" and args.memory_scale != "published" else {}),
        **({"memory_sink": True} if mode != "baseline" and args.memory_sink else {}),
        **({"score_scale": args.score_scale} if mode == "hmt" and args.score_scale != "sqrt" else {}),
    }


def checkpointer_node(checkpoint_dir: Path, output_dir: Path) -> Dict[str, Any]:
    return {"_component_": "hmt_plugin.checkpointing.hf_checkpointer",
            "checkpoint_dir": str(checkpoint_dir), "output_dir": str(output_dir)}


def tokenizer_node(args) -> Dict[str, Any]:
    return {"_component_": "hmt_plugin.data.hf_tokenizer", "path": str(args.backbone)}


# ---------------------------------------------------------------------------- books
def eval_pieces(args, settings: Settings, eval_dir: Path, cache: Path) -> Tuple[List[List[int]], List[str]]:
    """Pieces of ``eval_tokens`` tokens, ``pieces_per_book`` per book, starting ``eval_skip``
    tokens in (past the title pages); a book too short for one piece is left out and named."""
    from torchtune import config as tt_config
    from omegaconf import OmegaConf

    from hmt_plugin.data import long_text_dataset

    tokenizer = tt_config.instantiate(OmegaConf.create(tokenizer_node(args)))
    docs = long_text_dataset(tokenizer, str(eval_dir), strip_gutenberg=True, cache_dir=str(cache),
                             progress=False)
    pieces, names = [], []
    n = settings.eval_tokens
    for i in range(len(docs)):
        tokens = np.asarray(docs.document_tokens(i))[args.eval_skip :]
        count = min(args.pieces_per_book, len(tokens) // n)
        if count == 0:
            stderr(f"held-out document {i} has {len(tokens)} tokens after eval_skip: too short "
                   f"for one {n}-token piece, left out")
        for k in range(count):
            pieces.append(tokens[k * n : (k + 1) * n].tolist())
            names.append(f"doc{i}.piece{k}")
    if not pieces:
        raise SystemExit(f"no held-out book has {args.eval_skip + n} tokens; lower --eval_segments "
                         "or --eval_skip.")
    return pieces, names


# ---------------------------------------------------------------------------- training
def train_runs(args, settings: Settings, train_dir: Path, work: Path, cache: Path) -> Dict[str, Any]:
    """The fine-tuning runs ``--runs`` names, in order (stage 2 starts from stage 1)."""
    backbone = Path(args.backbone)
    s1, s2 = args.stage1_segments, args.stage2_segments
    plan = [
        # name, segments per window, steps, start from
        ("no_memory", s1, settings.single_stage_steps, None),
        ("rmt", s1, settings.single_stage_steps, None),
        ("hmt_stage1", s1, args.stage1_steps, None),
        ("hmt", s2, args.stage2_steps, "hmt_stage1"),
        # One segment as long as a held-out piece: the reader it trains has it all in context.
        ("full_context", 1, settings.full_context_steps, None),
    ]
    out = {}
    for name, segments, steps, start_from in plan:
        if name not in args.runs:
            continue
        run_dir = work / "runs" / name
        mode, segment_length = RUN_MODES[name], settings.run_segment_length(name)
        source, hmt_checkpoint = backbone, None
        if start_from:
            source = hmt_checkpoint = runs.final_dir(work / "runs" / start_from)
        model = hf_model_node(args, mode=mode, segment_length=segment_length,
                              bptt_depth=segments, lora=args.lora)
        cfg = {
            "output_dir": str(run_dir), "seed": args.seed, "device": args.device,
            "dtype": args.dtype, "model": model,
            "checkpointer": checkpointer_node(source, run_dir),
            "hmt_checkpoint": None if hmt_checkpoint is None else str(hmt_checkpoint),
            "resume_from_checkpoint": False, "tokenizer": tokenizer_node(args),
            "dataset": {"_component_": "hmt_plugin.data.long_text_dataset",
                        "source": str(train_dir), "strip_gutenberg": True,
                        "cache_dir": str(cache), "progress": False},
            "windows": {"random_offset": True}, "collate_fn": "hmt_plugin.data.segment_collate",
            "shuffle": True, "batch_size": settings.run_batch_size(name),
            "loss_scope": args.loss_scope,
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 0.0},
            "lr_scheduler": runs.cosine_schedule(steps), "epochs": 1,
            "max_steps_per_epoch": steps, "gradient_accumulation_steps": 1,
            "clip_grad_norm": 1.0, "compile": False,
            "enable_activation_checkpointing": args.device == "cuda",
            "metric_logger": runs.disk_logger(run_dir / "logs"), "log_every_n_steps": 1,
            "save_every_n_steps": max(1, steps // 4), "keep_last_n_checkpoints": 1,
        }
        if args.hmt_lr is not None and mode != "baseline":
            cfg["hmt_lr"] = args.hmt_lr
        # New tokens per segment: a baseline segment is all new tokens.
        new_tokens = segment_length if mode == "baseline" else settings.new_tokens
        tokens_per_step = settings.run_batch_size(name) * segments * new_tokens
        launch = dict(launcher=args.launcher, threads=args.threads, cache_dir=cache)
        out[name] = train_run(args, name, run_dir, cfg, launch, steps, None, tokens_per_step)
        out[name]["train_tokens"] = steps * tokens_per_step
    return out


# ---------------------------------------------------------------------------- evaluation
def reader_model_node(args, settings: Settings, run: Optional[str], mode: str,
                      memory_init: Optional[str] = None) -> Dict[str, Any]:
    """The model node a reader builds: in the run's own mode (the untuned backbone: in
    ``hmt_stage1`` for the step-0 readers, else ``baseline``)."""
    if run is None:
        trained_mode = "hmt_stage1" if mode == "hmt_stage1" else "baseline"
        segment_length = settings.segment_length[trained_mode]
    else:
        trained_mode, segment_length = RUN_MODES[run], settings.run_segment_length(run)
    node = hf_model_node(args, mode=trained_mode, segment_length=segment_length,
                         bptt_depth=1, lora=False)
    if memory_init is not None:
        node["memory_init"] = memory_init
    return node


def load_reader_model(args, settings: Settings, work: Path, run: Optional[str], mode: str,
                      memory_init: Optional[str] = None):
    """The model a reader reads with: a run's ``final`` weights, or the untuned backbone with
    fresh HMT parameters. Built in the run's own mode; the caller switches modes."""
    from torchtune import training

    if run is None:
        source, hmt_checkpoint = Path(args.backbone), None
    else:
        source = hmt_checkpoint = runs.final_dir(work / "runs" / run)
    node = reader_model_node(args, settings, run, mode, memory_init)
    device = torch.device(args.device)
    return load_model(node, source, hmt_checkpoint, work / "scratch", device=device,
                      dtype=training.get_dtype(args.dtype, device), seed=args.seed)


def load_model(node: Dict[str, Any], source: Path, hmt_checkpoint: Optional[Path], scratch: Path,
               *, device: torch.device, dtype: torch.dtype, seed: int):
    """The HMT model ``node`` builds, its backbone read from ``source`` (a run's ``final``
    directory or the pretrained backbone) and its HMT parameters from ``hmt_checkpoint``
    (None: freshly drawn)."""
    from omegaconf import OmegaConf

    from hmt_plugin.eval.model_loading import load_hmt_model

    return load_hmt_model(
        OmegaConf.create(node), OmegaConf.create(checkpointer_node(source, scratch)),
        None if hmt_checkpoint is None else str(hmt_checkpoint), device=device, dtype=dtype,
        seed=seed,
    )


def read(args, settings: Settings, work: Path, label: str, run: Optional[str], how: str,
         pieces: List[List[int]]) -> Tuple[np.ndarray, Dict[int, int], float]:
    """One reader's ``[pieces, eval_tokens]`` NLL (and its recall distances, seconds)."""
    import time

    from hmt_plugin.eval.token_nll import hmt_token_nll, window_token_nll

    mode, _, init = how.partition(":")
    model = load_reader_model(args, settings, work, run, mode, memory_init=init or None)
    distances: Dict[int, int] = {}
    t0 = time.perf_counter()
    if mode in ("pieces", "sliding", "full"):
        if mode == "pieces":
            model.set_mode("baseline", keep_tokens_per_segment=True)
            nll = hmt_token_nll(model, pieces, batch_size=args.eval_batch_size)
        else:
            window = settings.eval_tokens if mode == "full" else settings.sliding_window
            stride = settings.eval_tokens if mode == "full" else settings.new_tokens
            batch = 1 if mode == "full" else 4 * args.eval_batch_size
            nll = window_token_nll(model.backbone, pieces, window=window, stride=stride,
                                   batch_size=batch)
    else:
        if model.config.mode != mode:
            model.set_mode(mode, keep_tokens_per_segment=True)
        assert model.config.tokens_per_segment == settings.new_tokens
        nll = hmt_token_nll(model, pieces, batch_size=args.eval_batch_size,
                            recall_distances=distances if mode == "hmt" else None)
    seconds = time.perf_counter() - t0
    del model
    return nll, distances, seconds


def evaluate(args, settings: Settings, work: Path, pieces: List[List[int]],
             seed_free_from: Optional[Path] = None) -> Dict[str, Any]:
    """Every reader, each kept on disk as it finishes (``<work_dir>/eval``).

    ``seed_free_from``: another seed's ``eval`` folder, whose untuned backbone readers (no
    run, no HMT parameters: the same for every seed) are taken rather than read again."""
    out_dir = work / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(pieces).encode()).hexdigest()[:16]
    results = {}
    for label, run, how in READERS:
        if run is not None and run not in args.runs:
            continue
        name = label.replace(" ", "_").replace(",", "")
        stem = out_dir / name
        meta_path = stem.with_suffix(".json")
        mode, _, init = how.partition(":")
        # What a reader computes: its pieces, its weights (the run's config) and its model
        # (the untuned step-0 readers have no run, but a memory option changes them).
        stamp = {"pieces": key, "run": run, "how": how, "run_config": _run_stamp(work, run),
                 "model": reader_model_node(args, settings, run, mode, init or None)}
        seed_free = run is None and mode in ("pieces", "sliding", "full")
        stored = _stored_reader([d / name for d in (out_dir if args.reuse else None,
                                                    seed_free_from if seed_free else None)
                                 if d is not None], stamp)
        if stored is not None:
            nll, meta = stored
            stderr(f"eval {label}: reusing the stored {name}.npy")
        else:
            stderr(f"eval {label}: {len(pieces)} pieces of {settings.eval_tokens} tokens")
            nll, distances, seconds = read(args, settings, work, label, run, how, pieces)
            np.save(stem.with_suffix(".npy"), nll)
            meta = {"stamp": stamp, "recall_distance": {str(k): v for k, v in sorted(distances.items())},
                    "seconds": round(seconds, 1)}
            meta_path.write_text(json.dumps(meta))
        results[label] = (nll, meta)
    return results


def _stored_reader(stems: List[Path], stamp: Dict[str, Any]) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
    """The first of ``stems`` whose stored reader (``.npy`` and ``.json``) has ``stamp``."""
    for stem in stems:
        meta_path = stem.with_suffix(".json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta["stamp"] == stamp:
                return np.load(stem.with_suffix(".npy")), meta
    return None


def _run_stamp(work: Path, run: Optional[str]) -> Optional[str]:
    """What identifies a run's weights: its config file's text (None: the untuned backbone)."""
    if run is None:
        return None
    path = work / "runs" / f"{run}.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def summarise(settings: Settings, results: Dict[str, Tuple[np.ndarray, Dict[str, Any]]],
              bands_at: Sequence[int]) -> Dict[str, Any]:
    """Band perplexities, whole-piece perplexity, paired differences and the gap closed."""
    from hmt_plugin.eval.token_nll import band_scores, paired_difference

    block = settings.new_tokens
    ends = sorted({min(settings.eval_tokens, max(block, t - t % block)) for t in bands_at}
                  | {settings.eval_tokens})
    bands = list(zip([1] + ends[:-1], ends))
    out: Dict[str, Any] = {"bands": bands, "readers": {}}
    for label, (nll, meta) in results.items():
        out["readers"][label] = {
            "bands": [b.to_dict() for b in band_scores(nll, bands, block)],
            "all": band_scores(nll, [(1, settings.eval_tokens)], block)[0].to_dict(),
            "recall_distance": meta.get("recall_distance", {}),
            "seconds": meta.get("seconds"),
        }
    pairs = [("no memory", "hmt"), ("sliding window", "hmt"), ("rmt", "hmt"),
             ("hmt stage 1", "hmt"), ("hmt, recall off", "hmt"), ("no memory", "hmt stage 1"),
             ("sliding window", "hmt stage 1"), ("no memory", "rmt"),
             ("no memory (untuned)", "no memory"),
             ("sliding window, hmt stage 1 backbone", "hmt stage 1"),
             ("sliding window, hmt backbone", "hmt"),
             ("sliding window", "sliding window, hmt backbone"),
             ("full context (untuned)", "full context"), ("hmt", "full context"),
             ("hmt stage 1, step 0, published init", "hmt stage 1, step 0, mean-embedding init")]
    out["paired"] = {}
    for a, b in pairs:
        if a in results and b in results:
            d = paired_difference(results[b][0], results[a][0], block)
            # Per piece (one per book by default): whether a difference holds book by book
            # or comes from one book, which the segment-level s.e. cannot tell.
            d["by_piece"] = [float(x) for x in np.nanmean(results[a][0] - results[b][0], axis=1)]
            # From segment 2 on: in segment 1 nothing is carried yet (a learned first memory
            # is a trained prefix there), so this is what a memory passed on is worth.
            later = paired_difference(results[b][0][:, block:], results[a][0][:, block:], block)
            d["after_first_segment"] = {k: later[k] for k in ("nll_difference", "nll_difference_se")}
            out["paired"][f"{a} minus {b}"] = d
    out["gap_closed"] = gap_closed({label: r["all"]["nll"] for label, r in out["readers"].items()})
    return out


# (floor, top) of the log-PPL gap: fine-tuned to fine-tuned, and to the untuned full context
# (the only top when the full-context arm is not trained), and untuned to untuned.
GAPS = [("no memory", "full context"), ("no memory", "full context (untuned)"),
        ("no memory (untuned)", "full context (untuned)")]


def gap_closed(nll: Dict[str, float]) -> Dict[str, float]:
    """The fraction of each floor -> top gap in mean NLL (log-PPL) that HMT and the sliding
    window close, for the readers ``nll`` has; a gap that is not positive is left out."""
    gaps = {}
    for floor, top in GAPS:
        if floor not in nll or top not in nll or nll[floor] <= nll[top]:
            continue
        for reader in ("hmt", "sliding window"):
            if reader in nll:
                gaps[f"{reader} between {floor} and {top}"] = (
                    (nll[floor] - nll[reader]) / (nll[floor] - nll[top]))
    return gaps


def across_seeds(evals: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """Each reader's whole-piece PPL and each paired NLL difference, seed by seed, with the
    mean and the sample standard deviation over seeds (the untuned readers: 0 by design)."""
    def spread(values: List[float]) -> Dict[str, Any]:
        return {"by_seed": values, "mean": float(np.mean(values)),
                "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}

    first = next(iter(evals.values()))
    seeds = list(evals)
    return {
        "seeds": seeds,
        "ppl": {label: spread([evals[s]["readers"][label]["all"]["ppl"] for s in seeds])
                for label in first["readers"]},
        "paired": {pair: spread([evals[s]["paired"][pair]["nll_difference"] for s in seeds])
                   for pair in first["paired"]},
        # A gap some seed did not have (not positive there) has no spread.
        "gap_closed": {what: spread([evals[s]["gap_closed"][what] for s in seeds])
                       for what in first.get("gap_closed", {})
                       if all(what in evals[s].get("gap_closed", {}) for s in seeds)},
    }


# ---------------------------------------------------------------------------- the benchmark
def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """One seed's benchmark in ``--work_dir``; with ``--seeds``, each further seed's in
    ``<work_dir>/seed<N>`` (the same books, pieces and token cache), and the spread."""
    first = run_seed(args, Path(args.work_dir))
    if len(args.seeds) == 1:
        return first
    evals = {args.seeds[0]: first["eval"]}
    first["runs_by_seed"] = {}
    for seed in args.seeds[1:]:
        seed_args = copy.copy(args)
        seed_args.seed = seed
        one = run_seed(seed_args, Path(args.work_dir) / f"seed{seed}", shared=Path(args.work_dir))
        evals[seed] = one["eval"]
        first["runs_by_seed"][seed] = one["runs"]
    first["across_seeds"] = across_seeds(evals)
    return first


def run_seed(args: argparse.Namespace, work: Path, shared: Optional[Path] = None) -> Dict[str, Any]:
    """Train every arm with ``args.seed`` in ``work`` and read them all. ``shared``: the
    first seed's folder, whose token cache and untuned readers are used again."""
    if args.threads:
        torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    cache = (shared or work) / "token_cache"
    settings = Settings(args)
    train_dir, eval_dir, data = split_books(args, work)
    pieces, names = eval_pieces(args, settings, eval_dir, cache)
    data.update(eval_pieces=len(pieces), eval_piece_names=names, eval_tokens=settings.eval_tokens,
                eval_skip=args.eval_skip, scored_tokens_per_reader=len(pieces) * (settings.eval_tokens - 1))
    training = train_runs(args, settings, train_dir, work, cache)
    results = evaluate(args, settings, work, pieces,
                       seed_free_from=None if shared is None else shared / "eval")
    summary = summarise(settings, results, args.context_lengths)
    return {
        "data": data, "runs": training, "eval": summary,
        "sizes": {"new_tokens_per_segment": settings.new_tokens,
                  "segment_length_by_mode": settings.segment_length,
                  "train_tokens_per_arm": settings.train_tokens,
                  "single_stage_steps": settings.single_stage_steps,
                  "full_context_steps": settings.full_context_steps},
    }


# ---------------------------------------------------------------------------- output
def _ppl(score: Dict[str, float]) -> str:
    return f"{score['ppl']:.2f} ± {score['ppl_high'] - score['ppl']:.2f}"


def _difference(d: Optional[Dict[str, float]]) -> str:
    return "" if d is None else f"{d['nll_difference']:+.4f} ± {d['nll_difference_se']:.4f}"


def tables(record: Dict[str, Any]) -> str:
    res = record["results"]
    ev, data, sizes = res["eval"], res["data"], res["sizes"]
    readers = ev["readers"]
    out = [f"## quality on a pretrained backbone\n\n{header(record)}\n",
           f"Backbone `{record['settings']['backbone']}`; trained on {len(data['train_books'])} "
           f"books, {sizes['train_tokens_per_arm']:,} tokens per arm; evaluated on "
           f"{data['eval_pieces']} pieces of {data['eval_tokens']} tokens from "
           f"{len(data['eval_books'])} held-out books ({', '.join(data['eval_books'])}), the same "
           f"{data['scored_tokens_per_reader']:,} scored tokens for every reader; "
           f"{sizes['new_tokens_per_segment']} new tokens per segment in every mode.\n"]
    head = ["reader"] + [f"tokens {a}-{b}" for a, b in ev["bands"]] + ["all tokens", "s"]
    rows = [[label] + [_ppl(b) for b in r["bands"]] + [_ppl(r["all"]), r["seconds"]]
            for label, r in readers.items()]
    out.append("### Perplexity by position in the piece (± one standard error over segments)\n")
    out.append(markdown_table(head, rows))
    out.append("\n### Paired differences (mean NLL of the first minus the second, same tokens)\n")
    out.append(markdown_table(
        ["pair", "NLL difference", "s.e.", "PPL ratio", "by piece", "segments 2.. (± s.e.)"],
        [[k, round(v["nll_difference"], 4), round(v["nll_difference_se"], 4),
          round(math.exp(v["nll_difference"]), 4),
          " ".join(f"{x:+.3f}" for x in v.get("by_piece", [])),
          _difference(v.get("after_first_segment"))] for k, v in ev["paired"].items()]))
    spread = res.get("across_seeds")
    if spread:
        seeds = ", ".join(map(str, spread["seeds"]))
        out.append(f"\n### Over training seeds {seeds} (mean ± sample standard deviation)\n")
        out.append(markdown_table(
            ["reader or pair", "by seed", "mean", "sd"],
            [[k, " ".join(f"{x:.4g}" for x in v["by_seed"]), round(v["mean"], 4),
              None if v["sd"] is None else round(v["sd"], 4)]
             for part in ("ppl", "paired", "gap_closed") for k, v in spread[part].items()]))
    if ev.get("gap_closed"):
        out.append("\n### Fraction of the log-PPL gap closed\n")
        out.append(markdown_table(["what", "fraction"],
                                  [[k, round(v, 3)] for k, v in ev["gap_closed"].items()]))
    out.append("\n### Training runs\n")
    out.append(markdown_table(
        ["run", "steps", "tokens/step", "train tokens", "wall s", "final loss (last 5 logs)"],
        [[name, r["steps"], r["tokens_per_step"], r["train_tokens"], r["wall_s"],
          r["final_metrics"].get("loss")] for name, r in res["runs"].items()]))
    return "\n".join(out)


def write_plots(record: Dict[str, Any], out_dir: Path) -> List[Path]:
    from hmt_plugin.eval.plots import plot_band_ppl, plot_recall_histogram

    ev = record["results"]["eval"]
    out_dir = Path(out_dir)
    shown = [l for l in ev["readers"] if "step 0" not in l]
    written = [
        plot_band_ppl({l: ev["readers"][l]["bands"] for l in shown},
                      out_dir / "quality_pretrained_ppl_by_position.png"),
        plot_recall_histogram({"hmt": ev["readers"].get("hmt", {}).get("recall_distance", {})},
                              out_dir / "quality_pretrained_recall_distance.png"),
    ]
    return [p for p in written if p is not None]


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hmt_plugin.bench quality --backbone DIR",
        # No abbreviations: a preset fills every flag not spelled out on the command line.
        allow_abbrev=False,
        description="Fine-tune no-memory, RMT and two-stage HMT arms of a pretrained HF "
                    "backbone the same way and compare them, with a sliding window and full "
                    "context, on the same tokens of held-out books.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", required=True, help="a Hugging Face checkpoint directory")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="selects the size preset (cpu: about an hour on 2 cores; cuda: bf16, "
                        "sized from step times measured on one H200 for about 10 minutes)")
    g = p.add_argument_group("books")
    g.add_argument("--books", default=str(SHARED_BOOKS), help="split here into train / held out")
    g.add_argument("--num_eval_books", type=int, default=6)
    g.add_argument("--num_train_books", type=int, default=None, help="default: all the others")
    g.add_argument("--split_seed", type=int, default=0)
    g.add_argument("--train_books", help="a folder of training books (with --eval_books)")
    g.add_argument("--eval_books", help="a folder of held-out books")
    g = p.add_argument_group("HMT")
    g.add_argument("--segment_length", type=int, default=256)
    g.add_argument("--num_sensory", type=int, default=32)
    g.add_argument("--cache_size", type=int, default=300)
    g.add_argument("--memory_init", choices=MEMORY_INITS, default="mean_embedding")
    g.add_argument("--memory_scale", choices=MEMORY_SCALES, default="published",
                   help="the length of the written memory (HMTConfig.memory_scale)")
    g.add_argument("--memory_sink", action="store_true",
                   help="a learned sink embedding at position 0 of every memory segment "
                        "(HMTConfig.memory_sink)")
    g.add_argument("--score_scale", choices=SCORE_SCALES, default="sqrt",
                   help="divisor of the recall scores (HMTConfig.score_scale)")
    g.add_argument("--max_seq_len", type=int, default=8192,
                   help="the backbone's RoPE table; at least the full-context reader's window")
    g = p.add_argument_group("fine-tuning (one budget of tokens for every arm)")
    g.add_argument("--lora", action="store_true",
                   help="LoRA on every projection instead of a full fine-tune")
    g.add_argument("--lora_rank", type=int, default=16)
    # The default is the preset's (filled in by parse).
    g.add_argument("--runs", nargs="+", choices=RUNS, default=argparse.SUPPRESS,
                   help="the fine-tuning runs to do (and read); hmt needs hmt_stage1. The untuned "
                        "readers always run. Default: the preset's (cpu: all but full_context)")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--hmt_lr", type=float, default=None,
                   help="learning rate of the HMT parameters (recipe key hmt_lr; default: --lr)")
    g.add_argument("--loss_scope", choices=["all", "last"], default="all")
    for name in ("batch_size", "full_context_batch_size", "stage1_segments", "stage2_segments",
                 "stage1_steps", "stage2_steps"):
        g.add_argument(f"--{name}", type=int, default=None)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_segments", type=int, default=None, help="piece length in segments")
    g.add_argument("--eval_skip", type=int, default=2048, help="tokens skipped into each book")
    g.add_argument("--pieces_per_book", type=int, default=None)
    g.add_argument("--eval_batch_size", type=int, default=None)
    g.add_argument("--context_lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000],
                   help="band ends, cut to whole segments")
    g = p.add_argument_group("run")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    g.add_argument("--work_dir", default=None, help="default: outputs/bench/quality-<backbone name>")
    g.add_argument("--out", default=None, help="JSON result (default: <work_dir>/quality.json)")
    g.add_argument("--launcher", choices=runs.LAUNCHERS, default="subprocess")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train and read every arm once per seed, the first in --work_dir, the "
                        "others in <work_dir>/seed<N>, and report the spread over seeds "
                        "(default: --seed alone; each seed costs a whole benchmark's training)")
    g.add_argument("--reuse", action="store_true",
                   help="keep finished runs and readers whose inputs are unchanged; resume an "
                        "interrupted run from its newest step checkpoint")
    g.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: a smoke run")
    return p


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    preset = PRESETS["quick" if args.quick else args.device]
    for key, value in preset.items():
        if key not in explicit:
            setattr(args, key, copy.copy(value))
    if args.train_books or args.eval_books:
        args.books = None  # two folders given: no split
    args.backbone = str(Path(args.backbone).expanduser())
    if not (Path(args.backbone) / "config.json").is_file():
        parser.error(f"--backbone {args.backbone} holds no config.json: point it at a Hugging Face "
                     "checkpoint directory (e.g. the one ../shared/tools/smollm2_135m.sh prints).")
    if args.seeds is None:
        args.seeds = [args.seed]
    elif len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; give each once.")
    elif "seed" in explicit and args.seed != args.seeds[0]:
        parser.error("give --seed or --seeds, not both (--seeds' first seed is the one in "
                     "--work_dir).")
    args.seed = args.seeds[0]
    if "hmt" in args.runs and "hmt_stage1" not in args.runs:
        parser.error("--runs hmt starts from hmt_stage1's weights: add hmt_stage1.")
    if args.work_dir is None:
        args.work_dir = f"outputs/bench/quality-{Path(args.backbone).name}"
    if args.out is None:
        args.out = str(Path(args.work_dir) / "quality.json")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    run = BenchRun("quality-pretrained", argv, command="quality")
    results = run_benchmark(args)
    record = run.finish(args.out, tables, settings=vars(args), results=results,
                        machine=machine_info(args.device, args.dtype))
    for png in write_plots(record, Path(args.out).parent):
        print(f"Wrote {png}")
    return record
