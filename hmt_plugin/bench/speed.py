"""Speed and peak memory: HMT against the same backbone without memory and with full attention.

    python -m hmt_plugin.bench speed                       # CPU, a 28M random Llama
    python -m hmt_plugin.bench speed-gpu                   # CUDA, bf16, Llama 3.2 1B dims

For each segment length and each document length T, one random document of T tokens is read
three ways by one randomly initialised backbone, each computing the next-token NLL of every
token as an evaluation does:

(a) ``hmt``: HMT streaming the document in calls of ``chunk_segments`` segments, passing the
    state on (``logits="none"``, labels given), so memory stays bounded whatever T is;
(b) ``baseline``: the same model in ``baseline`` mode over the same document with the same
    chunking: the backbone segment by segment, no memory;
(c) ``full``: the plain torchtune decoder over the whole document at once (causal SDPA), the
    NLL projected 1024 positions at a time so the ``[T, vocab]`` logits never exist at once.
    Skipped beyond ``--full_max_len`` (its cost grows as T^2) and reported as "does not fit"
    when the allocation fails.

Each cell starts with one untimed run that warms up and measures peak memory (see
:mod:`hmt_plugin.bench.memory`), then ``--repeats`` timed runs (fewer once their total passes
``--repeat_budget_s``); the median is reported. The (a)/(b) time ratio is HMT's overhead: HMT
reads every token in the segment pass (``segment_length`` slots for ``tokens_per_segment``
new tokens) plus ``sum_fraction`` of it in the representation pass, so its floor is about 1.5.

Then one training step (forward + backward, the recipes' ``batch_loss``) over a window of
``bptt_depth`` segments, HMT against ``baseline``, at each ``--train_depths``.

If the (a)/(b) ratio exceeds ``--target_ratio`` (or with ``--profile always``), the time of
one HMT read and one baseline read is broken down by phase, and torch.profiler's top ops are
listed, so the owner of the model code can see where the overhead goes.
"""

import argparse
import contextlib
import dataclasses
import functools
import statistics
import time
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchtune import training

from hmt_plugin.bench.memory import PROBE_CHOICES, describe, make_probe, rss_sampler, run_measured
from hmt_plugin.bench.report import BenchRun, header, machine_info, markdown_table, stderr
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers
from hmt_plugin.modules.hmt import HMT
from hmt_plugin.modules.hmt_config import HMTConfig
from hmt_plugin.training.loss import batch_loss

# Backbone sizes. ``cpu-28m`` makes a 100k-token document a matter of minutes on a few CPU
# cores; ``llama3_2_1b`` has the dimensions of Llama 3.2 1B (random weights: speed and
# memory do not depend on the values); ``tiny`` is for dry runs and the smoke test.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu-28m": dict(
        family="llama3", vocab_size=8192, num_layers=6, num_heads=8, num_kv_heads=8,
        embed_dim=512, intermediate_dim=1408, rope_base=10_000.0,
    ),
    "cpu-13m": dict(
        family="llama3", vocab_size=8192, num_layers=4, num_heads=6, num_kv_heads=6,
        embed_dim=384, intermediate_dim=1024, rope_base=10_000.0,
    ),
    "llama3_2_1b": dict(
        family="llama3_2", vocab_size=128_256, num_layers=16, num_heads=32, num_kv_heads=8,
        embed_dim=2048, intermediate_dim=8192, rope_base=500_000.0,
    ),
    "tiny": dict(
        family="llama3", vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
        embed_dim=64, intermediate_dim=128, rope_base=10_000.0,
    ),
}
DIMS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROJECTION_CHUNK = 1024

# What --tiny sets (a dry run: builds everything and runs each measurement once, in seconds).
TINY_SETTINGS = dict(
    preset="tiny", lengths=[200, 500], segment_lengths=[64], num_sensory=8, cache_size=16,
    chunk_segments=4, repeats=1, train_repeats=1, train_depths=[2], train_loss_scopes=["last"],
    profile_length=300,
)


# ---------------------------------------------------------------------------- the model
def backbone_dims(args: argparse.Namespace) -> Dict[str, Any]:
    """The preset's dimensions with any explicit ``--<dim>`` flag applied."""
    dims = dict(PRESETS[args.preset])
    for name in DIMS:
        value = getattr(args, name)
        if value is not None:
            dims[name] = value
    return dims


def build_backbone(dims: Dict[str, Any], max_seq_len: int) -> torch.nn.Module:
    """A randomly initialised torchtune decoder (``llama3``: untied output, plain RoPE;
    ``llama3_2``: tied embeddings and Llama 3.2's scaled RoPE)."""
    kwargs = {k: dims[k] for k in DIMS}
    if dims["family"] == "llama3_2":
        from torchtune.models.llama3_2 import llama3_2

        return llama3_2(max_seq_len=max_seq_len, rope_base=int(dims["rope_base"]), **kwargs)
    from torchtune.models.llama3 import llama3

    return llama3(max_seq_len=max_seq_len, rope_base=dims["rope_base"], **kwargs)


def hmt_config(args: argparse.Namespace, segment_length: int) -> HMTConfig:
    return HMTConfig(
        segment_length=segment_length,
        mode="hmt",
        num_sensory=args.num_sensory,
        sum_fraction=args.sum_fraction,
        recall_hidden_dim=args.recall_hidden_dim,
        cache_size=args.cache_size,
        # A training window of D segments backpropagates through all D of them when the
        # truncation depth is at least D; each window is one call here.
        bptt_depth=max(args.train_depths or [1]),
    )


def slot_floor(config: HMTConfig) -> float:
    """Backbone positions HMT runs per new token, relative to ``baseline`` (1 per token):
    ``segment_length`` slots per segment plus ``summary_tokens + 2m`` in the representation
    pass, for ``tokens_per_segment`` new tokens. The time ratio cannot go much below this."""
    slots = config.segment_length + config.summary_tokens + 2 * config.num_memory_tokens
    return slots / config.tokens_per_segment


def flop_estimate(dims: Dict[str, Any], config: HMTConfig) -> Dict[str, float]:
    """Forward matmul FLOPs per new token of HMT and of the no-memory read, and their ratio.

    The backbone positions ratio (:func:`slot_floor`) holds for the layers alone; the output
    projection and cross-entropy run once per token in both reads (HMT's representation pass
    projects nothing), so a model whose vocabulary projection is a large share of its compute
    has a lower ratio. Attention is counted at the causal average of half the sequence."""
    d, layers = dims["embed_dim"], dims["num_layers"]
    head = d // dims["num_heads"]
    q, kv = dims["num_heads"] * head, dims["num_kv_heads"] * head
    per_position = 2 * layers * (2 * d * q + 2 * d * kv + 3 * d * dims["intermediate_dim"])

    def run(seq: int) -> float:
        return seq * (per_position + 2 * 2 * layers * q * seq / 2)

    projection = 2 * d * dims["vocab_size"]
    L = config.segment_length
    baseline = run(L) / L + projection
    rep = config.summary_tokens + 2 * config.num_memory_tokens
    hmt = (run(L) + run(rep)) / config.tokens_per_segment + projection
    return {"hmt": hmt, "baseline": baseline, "ratio": hmt / baseline}


# ---------------------------------------------------------------------------- the reads
def read_streaming(model: HMT, doc: torch.Tensor, chunk_segments: int) -> torch.Tensor:
    """(a)/(b): the summed NLL of ``doc`` read in calls of ``chunk_segments`` segments of the
    model's current mode, with the state carried from call to call (an evaluation's loop)."""
    chunk = chunk_segments * model.config.tokens_per_segment
    total = torch.zeros((), dtype=torch.float64, device=doc.device)
    state = None
    with torch.inference_mode():
        for lo in range(0, doc.shape[1], chunk):
            piece = doc[:, lo : lo + chunk]
            out = model(piece, labels=piece, state=state, logits="none")
            total += out.nll.sum(dtype=torch.float64)
            state = out.state
    return total


def read_full(decoder: torch.nn.Module, doc: torch.Tensor) -> torch.Tensor:
    """(c): the summed NLL of ``doc`` from one decoder pass over all of it (plain causal
    attention), projected to the vocabulary ``PROJECTION_CHUNK`` positions at a time."""
    total = torch.zeros((), dtype=torch.float64, device=doc.device)
    length = doc.shape[1]
    with torch.inference_mode():
        hidden = run_layers(decoder, embed_tokens(decoder, doc))
        for lo in range(0, length - 1, PROJECTION_CHUNK):
            hi = min(lo + PROJECTION_CHUNK, length - 1)
            logits = project(decoder, hidden[:, lo:hi])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), doc[:, lo + 1 : hi + 1].reshape(-1),
                reduction="sum",
            ).double()
    return total


def train_step(
    model: HMT,
    tokens: torch.Tensor,
    loss_scope: str,
    optimizer: Optional[torch.optim.Optimizer] = None,
    **loss_options: Any,
) -> torch.Tensor:
    """One forward + backward over a window, as the fine-tuning recipe computes it (its
    ``batch_loss``, with ``loss_options`` such as ``log_all_segments`` and
    ``checkpoint_segments``), then ``optimizer.step()`` when one is given."""
    for p in model.parameters():
        p.grad = None
    rows, width = tokens.shape
    batch = {"tokens": tokens, "labels": tokens, "seq_lens": torch.full((rows,), width)}
    loss = batch_loss(model, batch, tokens.device, loss_scope, **loss_options)
    (loss.loss_sum / loss.num_tokens).backward()
    if optimizer is not None:
        optimizer.step()
    return loss.loss_sum.detach() / loss.num_tokens


# ---------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "defaultcpuallocator")
    )


def cpu_clock() -> Callable[[], float]:
    """CPU time of the work: the calling thread's when torch computes on one thread (exact,
    and blind to other processes competing for the cores, unlike wall time), else the
    whole process's (worker threads included, spin-waiting too)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


@dataclasses.dataclass
class Variant:
    """One way of doing the work of a cell: ``fn()`` returns a scalar tensor (NLL or loss)."""

    name: str
    fn: Callable[[], torch.Tensor]
    tokens: int  # new tokens one call reads, for tokens per second


def measure_interleaved(
    variants: Sequence[Variant],
    *,
    device: torch.device,
    probe,
    repeats: int,
    budget_s: float,
    rss: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Measure several variants of the same work side by side.

    Each variant first runs once untimed under the memory probe (warm-up and peak memory).
    Then the timed runs go in rounds, one run of each variant per round, so a change in the
    machine's load hits all variants alike; rounds stop after ``repeats`` or once they took
    ``budget_s`` (at least one round). Per variant: wall and CPU seconds of each run, their
    medians, tokens per second, peak memory, RSS peak, and the value of the last run."""
    results: Dict[str, Dict[str, Any]] = {}
    live: List[Variant] = []
    for v in variants:
        try:
            value, peak_mb = run_measured(lambda: _synced(v.fn, device), probe)
        except RuntimeError as err:
            results[v.name] = _oom_result(err, device)
            continue
        results[v.name] = {"status": "ok", "peak_mb": None if peak_mb is None else round(peak_mb, 1),
                           "seconds": [], "cpu_seconds": [], "rss": [], "value": float(value)}
        live.append(v)
    clock = cpu_clock()
    spent = 0.0
    for _ in range(max(1, repeats)):
        for v in list(live):
            res = results[v.name]
            sampler = rss_sampler(device) if rss else None
            try:
                with sampler.measure() if sampler is not None else contextlib.nullcontext() as reading:
                    _sync(device)
                    c0, t0 = clock(), time.perf_counter()
                    value = v.fn()
                    _sync(device)
                    wall, cpu = time.perf_counter() - t0, clock() - c0
            except RuntimeError as err:
                results[v.name] = _oom_result(err, device)
                live.remove(v)
                continue
            res["seconds"].append(round(wall, 4))
            res["cpu_seconds"].append(round(cpu, 4))
            res["value"] = float(value)
            if reading is not None:
                res["rss"].append(reading.peak_mb)
            spent += wall
        if spent >= budget_s:
            break
    for v in live:
        res = results[v.name]
        wall, cpu = statistics.median(res["seconds"]), statistics.median(res["cpu_seconds"])
        rss_values = res.pop("rss")
        res.update(
            median_s=round(wall, 4),
            median_cpu_s=round(cpu, 4),
            tokens_per_s=round(v.tokens / wall, 1),
            tokens_per_cpu_s=round(v.tokens / cpu, 1) if cpu > 0 else None,
            rss_peak_mb=round(max(rss_values), 1) if rss_values else None,
        )
    return results


def paired_ratio(a: Dict[str, Any], b: Dict[str, Any], key: str) -> Optional[float]:
    """Median over rounds of ``a``'s time over ``b``'s time in the same round."""
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    pairs = [x / y for x, y in zip(a[key], b[key]) if y > 0]
    return round(statistics.median(pairs), 3) if pairs else None


def _oom_result(err: RuntimeError, device: torch.device) -> Dict[str, Any]:
    if not _is_oom(err):
        raise err
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"status": "does not fit (out of memory)", "error": str(err).splitlines()[0]}


def _synced(fn: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    out = fn()
    _sync(device)
    return out


# ---------------------------------------------------------------------------- profiling
class PhaseTimer:
    """Wall time of HMT's phases, by wrapping the functions the model calls, for one read.

    Only this benchmark's process is affected, and only inside the ``with`` block: the
    functions are put back on exit. Times are exclusive (a wrapped call inside another is
    charged to itself, not to its caller); a backbone call inside the representation pass is
    charged to that pass. On CUDA each wrapped call synchronises, so the phases add up to
    the read's wall time (and the read is slower than an unprofiled one)."""

    # (owner, attribute name, phase label)
    TARGETS = (
        ("module", "run_layers", "backbone layers"),
        ("module", "embed_tokens", "token embedding"),
        ("module", "ragged_layout", "masks and positions"),
        ("outputs", "project", "final norm + output projection"),
        ("outputs", "_nll", "cross-entropy"),
        # HMT's four steps (its public operations), then the recall module inside them.
        ("hmt", "sensory_memory", "sensory memory"),
        ("hmt", "summarize", "representation pass (rest)"),
        ("hmt", "search_memory", "memory search (rest)"),
        ("hmt", "read_segment", "segment pass (rest)"),
        ("hmt", "write_memory", "memory write (final norm)"),
        ("recall", "forward", "memory search (recall attention)"),
        ("recall", "remember", "memory cache update"),
        # Around the steps: input checks, streaming bookkeeping, output assembly.
        ("module", "validate_inputs", "input checks"),
        ("module", "merge_pending", "pending tokens and segment plan"),
        ("module", "final_state", "outputs and state assembly"),
        ("heads", "result", "outputs and state assembly"),
    )

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._stack: List[List[Any]] = []
        self._saved: List[Any] = []
        self.missing: List[str] = []

    def _label(self, label: str) -> str:
        inside_summary = any(frame[0] == "representation pass (rest)" for frame in self._stack)
        if inside_summary and label != "representation pass (rest)":
            return f"representation pass: {label}"
        if label == "backbone layers":
            return "segment pass: backbone layers"
        return label

    def _wrap(self, fn: Callable, label: str) -> Callable:
        timer = self

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            name = timer._label(label)
            frame = [name, 0.0]  # label, time spent in wrapped callees
            timer._stack.append(frame)
            _sync(timer.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(timer.device)
                spent = time.perf_counter() - t0
                timer._stack.pop()
                timer.seconds[name] = timer.seconds.get(name, 0.0) + spent - frame[1]
                timer.calls[name] = timer.calls.get(name, 0) + 1
                if timer._stack:
                    timer._stack[-1][1] += spent

        return wrapped

    def __enter__(self) -> "PhaseTimer":
        import hmt_plugin.modules.hmt as hmt_module
        import hmt_plugin.modules.outputs as outputs_module
        from hmt_plugin.modules.recall import MemoryRecall

        owners = {
            "module": hmt_module,
            "outputs": outputs_module,
            "heads": outputs_module.SegmentOutputs,
            "hmt": HMT,
            "recall": MemoryRecall,
        }
        for owner_name, attr, label in self.TARGETS:
            owner = owners[owner_name]
            # The model code moves things around; a function that is not there is skipped
            # (its time shows up in its caller's phase or as unattributed).
            space = owner.__dict__ if isinstance(owner, type) else vars(owner)
            if attr not in space:
                self.missing.append(f"{owner_name}.{attr}")
                continue
            original = space[attr]
            self._saved.append((owner, attr, original))
            setattr(owner, attr, self._wrap(original, label))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()


def profile_reads(
    model: HMT, doc: torch.Tensor, chunk_segments: int, device: torch.device, top_ops: int = 12
) -> Dict[str, Any]:
    """Phase breakdown of one HMT read and one baseline read of ``doc``, and torch.profiler's
    top ops (self time) of each."""
    tokens = doc.numel()
    out: Dict[str, Any] = {"tokens": tokens}
    for mode in ("hmt", "baseline"):
        model.set_mode(mode)
        read_streaming(model, doc, chunk_segments)  # warm-up
        with PhaseTimer(device) as timer:
            _sync(device)
            t0 = time.perf_counter()
            read_streaming(model, doc, chunk_segments)
            _sync(device)
            total = time.perf_counter() - t0
        phases = dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1]))
        phases["unattributed (Python glue, cat, slicing)"] = total - sum(timer.seconds.values())
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            read_streaming(model, doc, chunk_segments)
        sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: -getattr(e, sort_key))[:top_ops]
        out[mode] = {
            "seconds": round(total, 4),
            "ms_per_1k_tokens": round(1000 * total / tokens * 1000, 2),
            "phases_s": {k: round(v, 4) for k, v in phases.items()},
            "calls": timer.calls,
            "not_instrumented": timer.missing,
            "top_ops": [
                {
                    "op": e.key,
                    "calls": e.count,
                    "self_s": round(getattr(e, sort_key) / 1e6, 4),
                }
                for e in events
            ],
        }
    model.set_mode("hmt")
    return out


# ---------------------------------------------------------------------------- the benchmark
def random_doc(vocab: int, length: int, batch: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


_random_doc = random_doc  # the name other benchmarks import


def run_speed(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dims = backbone_dims(args)
    lengths = sorted(set(args.lengths))
    full_lengths = [t for t in lengths if t <= args.full_max_len]
    max_seq_len = max([*args.segment_lengths, *full_lengths, 2])
    probe = make_probe(args.memory_probe, device)

    stderr(f"building a random {args.preset} backbone {dims} on {device} ({args.dtype})")
    with training.set_default_dtype(dtype), device:
        backbone = build_backbone(dims, max_seq_len)
    n_params = sum(p.numel() for p in backbone.parameters())
    results: Dict[str, Any] = {"eval": [], "train": [], "profile": {}}
    info = {
        "backbone_parameters": n_params,
        "memory_probe": describe(probe),
        "rss_during_timed_runs": rss_sampler(device) is not None and not args.no_rss,
        "cpu_clock": "thread_time" if cpu_clock() is time.thread_time else "process_time",
        "slot_floor": {},
        "flop_ratio": {},
        "tokens_per_segment": {},
    }

    for seg_len in args.segment_lengths:
        with training.set_default_dtype(dtype), device:
            model = HMT(backbone, hmt_config(args, seg_len))
        model.eval()
        cfg = model.config
        info["slot_floor"][str(seg_len)] = round(slot_floor(cfg), 4)
        info["flop_ratio"][str(seg_len)] = round(flop_estimate(dims, cfg)["ratio"], 4)
        info["tokens_per_segment"][str(seg_len)] = {
            "hmt": cfg.tokens_per_segment,
            "baseline": cfg.with_mode("baseline").tokens_per_segment,
            "summary_tokens": cfg.summary_tokens,
        }
        if not args.skip_eval:
            for length in lengths:
                results["eval"].append(_eval_cell(model, args, seg_len, length, device, probe))
        if args.train_depths:
            model.train()
            for scope in args.train_loss_scopes:
                for depth in args.train_depths:
                    results["train"].append(
                        _train_cell(model, args, seg_len, depth, scope, device, probe))
            model.eval()
        if not args.skip_eval and _wants_profile(args, results["eval"], seg_len):
            length = min(args.profile_length, max(lengths))
            stderr(f"profiling segment_length={seg_len} over {length} tokens")
            doc = random_doc(dims["vocab_size"], length, args.batch_size, device, args.seed)
            results["profile"][str(seg_len)] = profile_reads(model, doc, args.chunk_segments, device)
        model.set_mode("hmt")
        del model
    results["info"] = info
    return results


def _in_mode(model: HMT, mode: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run with ``model`` in ``mode`` (interleaved variants share one model)."""

    def run() -> torch.Tensor:
        model.set_mode(mode)
        return fn()

    return run


def _eval_cell(model: HMT, args, seg_len: int, length: int, device, probe) -> Dict[str, Any]:
    doc = random_doc(model.backbone.tok_embeddings.num_embeddings, length, args.batch_size,
                      device, args.seed)
    tokens = args.batch_size * length
    cell: Dict[str, Any] = {"segment_length": seg_len, "length": length}
    read = lambda: read_streaming(model, doc, args.chunk_segments)  # noqa: E731
    variants = [Variant(m, _in_mode(model, m, read), tokens)
                for m in ("hmt", "baseline") if m in args.variants]
    if "full" in args.variants:
        if length > args.full_max_len:
            cell["full"] = {"status": f"skipped (T > --full_max_len {args.full_max_len})"}
        else:
            variants.append(Variant("full", lambda: read_full(model.backbone, doc), tokens))
    stderr(f"  L={seg_len} T={length}: {', '.join(v.name for v in variants)}")
    cell.update(measure_interleaved(variants, device=device, probe=probe, repeats=args.repeats,
                                    budget_s=args.repeat_budget_s, rss=not args.no_rss))
    model.set_mode("hmt")
    for name in ("hmt", "baseline", "full"):
        res = cell.get(name)
        if res and res.get("status") == "ok":
            res["nll_per_token"] = round(res.pop("value") / (args.batch_size * (length - 1)), 4)
    if "hmt" in cell and "baseline" in cell:
        cell["ratio_hmt_over_baseline"] = paired_ratio(cell["hmt"], cell["baseline"], "seconds")
        if device.type == "cpu":
            cell["cpu_ratio_hmt_over_baseline"] = paired_ratio(cell["hmt"], cell["baseline"],
                                                               "cpu_seconds")
    return cell


def _train_cell(model: HMT, args, seg_len: int, depth: int, scope: str, device, probe) -> Dict[str, Any]:
    cell: Dict[str, Any] = {"segment_length": seg_len, "bptt_depth": depth, "loss_scope": scope}
    vocab = model.backbone.tok_embeddings.num_embeddings
    variants, windows = [], {}
    for mode in ("hmt", "baseline"):
        window = depth * model.config.with_mode(mode).tokens_per_segment
        tokens = random_doc(vocab, window, args.batch_size, device, args.seed + depth)
        windows[mode] = window
        step = partial(train_step, model, tokens, scope)
        variants.append(Variant(mode, _in_mode(model, mode, step), args.batch_size * window))
    stderr(f"  L={seg_len} train depth {depth}, loss_scope {scope}: hmt {windows['hmt']} / "
           f"baseline {windows['baseline']} tokens per row")
    cell.update(measure_interleaved(variants, device=device, probe=probe,
                                    repeats=args.train_repeats, budget_s=args.repeat_budget_s,
                                    rss=not args.no_rss))
    for mode in ("hmt", "baseline"):
        res = cell[mode]
        if res.get("status") == "ok":
            res["loss"] = round(res.pop("value"), 4)
        res["window_tokens"] = windows[mode]
    for p in model.parameters():
        p.grad = None
    model.set_mode("hmt")
    # Per token: the two windows hold the same number of segments, not the same tokens.
    a, b = cell["hmt"], cell["baseline"]
    if a.get("status") == "ok" and b.get("status") == "ok":
        cell["ratio_hmt_over_baseline"] = round(b["tokens_per_s"] / a["tokens_per_s"], 3)
        if device.type == "cpu" and a["tokens_per_cpu_s"] and b["tokens_per_cpu_s"]:
            cell["cpu_ratio_hmt_over_baseline"] = round(
                b["tokens_per_cpu_s"] / a["tokens_per_cpu_s"], 3)
    return cell


def _ratio_key(device: Any) -> str:
    """The ratio to judge by: CPU time on CPU (steady on a shared machine), wall on CUDA."""
    return "cpu_ratio_hmt_over_baseline" if torch.device(device).type == "cpu" else "ratio_hmt_over_baseline"


def _wants_profile(args, cells: List[Dict[str, Any]], seg_len: int) -> bool:
    if args.profile == "never":
        return False
    if args.profile == "always":
        return True
    key = _ratio_key(args.device)
    ratios = [c[key] for c in cells if c["segment_length"] == seg_len and c.get(key)]
    return bool(ratios) and statistics.median(ratios) > args.target_ratio


# ---------------------------------------------------------------------------- output
def _fmt_cell(res: Optional[Dict[str, Any]], key: str) -> Any:
    if not res:
        return None
    if res.get("status") != "ok":
        return res["status"].split(" (")[0] if key == "tokens_per_s" else None
    return res.get(key)


def tables(record: Dict[str, Any]) -> str:
    results = record["results"]
    info = results["info"]
    on_cpu = torch.device(record["settings"]["device"]).type == "cpu"
    if info["cpu_clock"] == "thread_time":
        clock = " CPU time ratios use the computing thread's CPU time (steady under other load)."
    else:
        clock = (" CPU time ratios use the process's CPU time over all threads (spin-waiting "
                 "included, so not steady under other load: use --threads 1 on a busy machine).")
    out = [f"## {record['benchmark']}\n\n{header(record)}\n",
           f"Backbone: {info['backbone_parameters']:,} parameters, random weights. tok/s: new "
           f"tokens per wall-clock second (median of the timed runs, variants interleaved). "
           f"Peak memory: {info['memory_probe']} (warm-up run)."
           + (" RSS: resident set above the start, sampled every 2 ms during the timed runs."
              if info["rss_during_timed_runs"] else "")
           + (clock if on_cpu else "")
           + "\n"]
    for seg_len in record["settings"]["segment_lengths"]:
        cells = [c for c in results["eval"] if c["segment_length"] == seg_len]
        tps = info["tokens_per_segment"][str(seg_len)]
        if cells:
            rows = []
            for c in cells:
                a, b, f = c.get("hmt"), c.get("baseline"), c.get("full")
                row = [c["length"], _fmt_cell(a, "tokens_per_s"), _fmt_cell(b, "tokens_per_s"),
                       _fmt_cell(f, "tokens_per_s"), c.get("ratio_hmt_over_baseline")]
                if on_cpu:
                    row.append(c.get("cpu_ratio_hmt_over_baseline"))
                row += [_fmt_cell(a, "peak_mb"), _fmt_cell(b, "peak_mb"), _fmt_cell(f, "peak_mb")]
                if info["rss_during_timed_runs"]:
                    row += [_fmt_cell(a, "rss_peak_mb"), _fmt_cell(f, "rss_peak_mb")]
                rows.append(row)
            heads = ["tokens", "(a) HMT tok/s", "(b) no memory tok/s", "(c) full attn tok/s",
                     "(a)/(b) wall"] + (["(a)/(b) CPU"] if on_cpu else []) + [
                     "(a) peak MiB", "(b) peak MiB", "(c) peak MiB"] + (
                     ["(a) RSS MiB", "(c) RSS MiB"] if info["rss_during_timed_runs"] else [])
            out.append(
                f"### Evaluation, segment_length {seg_len} (HMT: {tps['hmt']} new tokens per "
                f"segment, {tps['summary_tokens']} in the representation pass; no memory: "
                f"{tps['baseline']}; {record['settings']['chunk_segments']} segments per call)\n"
            )
            out.append(markdown_table(heads, rows))
            summary = []
            for label, key in (("wall", "ratio_hmt_over_baseline"), ("CPU", "cpu_ratio_hmt_over_baseline")):
                ratios = [c[key] for c in cells if c.get(key)]
                if ratios:
                    summary.append(f"{label} median {statistics.median(ratios):.3f} "
                                   f"(range {min(ratios):.3f}-{max(ratios):.3f})")
            if summary:
                out.append(
                    f"\n(a)/(b) time ratio: {'; '.join(summary)}. HMT over no memory, per new "
                    f"token: backbone positions {info['slot_floor'][str(seg_len)]:.3f}, estimated "
                    f"forward FLOPs (projection and attention included) "
                    f"{info['flop_ratio'][str(seg_len)]:.3f}. Target < "
                    f"{record['settings']['target_ratio']}.\n"
                )
        train = [c for c in results["train"] if c["segment_length"] == seg_len]
        if train:
            rows = []
            for c in train:
                row = [c["loss_scope"], c["bptt_depth"], c["hmt"].get("window_tokens"),
                       _fmt_cell(c["hmt"], "tokens_per_s"), _fmt_cell(c["baseline"], "tokens_per_s"),
                       c.get("ratio_hmt_over_baseline")]
                if on_cpu:
                    row.append(c.get("cpu_ratio_hmt_over_baseline"))
                row += [_fmt_cell(c["hmt"], "peak_mb"), _fmt_cell(c["baseline"], "peak_mb")]
                rows.append(row)
            out.append(f"### Training step (forward + backward), segment_length {seg_len}\n")
            out.append(markdown_table(
                ["loss_scope", "BPTT depth", "HMT window tokens", "HMT tok/s", "no memory tok/s",
                 "time/token ratio wall"] + (["time/token ratio CPU"] if on_cpu else [])
                + ["HMT peak MiB", "no memory peak MiB"],
                rows,
            ))
            out.append("")
        prof = results["profile"].get(str(seg_len))
        if prof:
            out.append(_profile_table(prof, seg_len))
    return "\n".join(out)


def _profile_table(prof: Dict[str, Any], seg_len: int) -> str:
    a, b = prof["hmt"], prof["baseline"]
    names = list(dict.fromkeys([*a["phases_s"], *b["phases_s"]]))
    rows = [[n, a["phases_s"].get(n), b["phases_s"].get(n),
             100 * a["phases_s"].get(n, 0.0) / a["seconds"]] for n in names]
    rows = [[n, x, y, f"{z:.1f}"] for n, x, y, z in rows]
    rows.append(["total", a["seconds"], b["seconds"], "100.0"])
    lines = [f"### Where HMT's time goes, segment_length {seg_len}, {prof['tokens']} tokens\n",
             markdown_table(["phase", "HMT s", "baseline s", "% of HMT"], rows), "",
             _profile_summary(a, b), "",
             "Top ops of the HMT read (self time):\n",
             markdown_table(["op", "calls", "self s"],
                            [[e["op"], e["calls"], e["self_s"]] for e in a["top_ops"]]), ""]
    return "\n".join(lines)


def _profile_summary(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """The profile in three ratios, each relative to the no-memory read's backbone time."""
    base = b["phases_s"].get("segment pass: backbone layers") or float("nan")
    seg = a["phases_s"].get("segment pass: backbone layers", 0.0)
    rep = a["phases_s"].get("representation pass: backbone layers", 0.0)
    rest = a["seconds"] - seg - rep
    rest_b = b["seconds"] - base
    return (
        f"Relative to the no-memory read's backbone time: HMT's segment pass "
        f"{seg / base:.3f}, its representation pass {rep / base:.3f}, everything else in HMT "
        f"{rest / base:.3f} (in the no-memory read: {rest_b / base:.3f}). Whole read: "
        f"{a['seconds'] / b['seconds']:.3f}."
    )


# ---------------------------------------------------------------------------- command line
def build_parser(prog: str, gpu: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Tokens/s and peak memory of (a) HMT streaming a long document, (b) the same "
            "backbone segment by segment without memory, (c) full attention over the whole "
            "document; and of one training step at several BPTT depths."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("backbone (random weights)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="llama3_2_1b" if gpu else "cpu-28m")
    for name in DIMS:
        g.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    g.add_argument("--device", default="cuda" if gpu else "cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("HMT")
    g.add_argument("--segment_lengths", type=int, nargs="+", default=[1024])
    g.add_argument("--num_sensory", type=int, default=32)
    g.add_argument("--sum_fraction", type=float, default=0.5)
    g.add_argument("--cache_size", type=int, default=300)
    g.add_argument("--recall_hidden_dim", type=int, default=None)

    g = p.add_argument_group("evaluation reads")
    g.add_argument("--lengths", type=int, nargs="+",
                   default=[2048, 4096, 10000, 30000, 60000, 100000])
    g.add_argument("--variants", nargs="+", choices=["hmt", "baseline", "full"],
                   default=["hmt", "baseline", "full"])
    g.add_argument("--chunk_segments", type=int, default=16,
                   help="segments per model call in (a) and (b)")
    g.add_argument("--full_max_len", type=int, default=131072 if gpu else 30000,
                   help="(c) is skipped for longer documents (its time grows as T^2)")
    g.add_argument("--batch_size", type=int, default=1, help="documents read side by side")
    g.add_argument("--skip_eval", action="store_true")

    g = p.add_argument_group("training step")
    g.add_argument("--train_depths", type=int, nargs="*", default=[2, 6, 15],
                   help="BPTT depths (segments per window); none to skip")
    g.add_argument("--train_loss_scopes", nargs="+", choices=["last", "all"],
                   default=["last", "all"],
                   help="the recipes' loss_scope: last (the published loss: only the last "
                        "segment's targets, so the no-memory model backpropagates one segment) "
                        "or all (every segment's targets)")
    g.add_argument("--train_repeats", type=int, default=3)

    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    g.add_argument("--repeat_budget_s", type=float, default=120.0,
                   help="stop repeating a cell once its timed runs took this long (>= 1 run)")
    g.add_argument("--memory_probe", choices=PROBE_CHOICES, default="auto",
                   help="auto: cuda on CUDA, tensor_bytes on CPU")
    g.add_argument("--no_rss", action="store_true",
                   help="do not sample RSS during timed CPU runs (each sample starts with a "
                        "gc + malloc_trim of about a second, outside the timed region)")
    g.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="auto: when the median (a)/(b) ratio exceeds --target_ratio")
    g.add_argument("--target_ratio", type=float, default=1.6)
    g.add_argument("--profile_length", type=int, default=10000)
    g.add_argument("--tiny", action="store_true",
                   help="dry run: tiny backbone, two short lengths, one repeat (seconds)")
    g.add_argument("--out", default="outputs/bench/speed-gpu.json" if gpu else "outputs/bench/speed.json")
    return p


def parse(argv: Sequence[str], prog: str, gpu: bool) -> argparse.Namespace:
    parser = build_parser(prog, gpu)
    args = parser.parse_args(argv)
    if args.tiny:
        explicit = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
        for key, value in TINY_SETTINGS.items():
            if key not in explicit:
                setattr(args, key, value)
    if min(args.lengths) < 2:
        parser.error("--lengths must be at least 2 tokens")
    for name in DIMS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu "
                     "(with --tiny for a dry run)")
    return args


def main(argv: Optional[Sequence[str]] = None, *, gpu: bool = False) -> Dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    name = "speed-gpu" if gpu else "speed"
    args = parse(argv, f"python -m hmt_plugin.bench {name}", gpu)
    run = BenchRun(name, argv)
    results = run_speed(args)
    settings = {k: v for k, v in vars(args).items()}
    settings["backbone"] = backbone_dims(args)
    record = run.finish(args.out, tables, settings=settings, results=results,
                        machine=machine_info(args.device, args.dtype))
    return record


def main_gpu(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return main(argv, gpu=True)
