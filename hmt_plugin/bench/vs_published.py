"""This project against the published HMT code (OswaldHe/HMT-pytorch), side by side.

    git clone https://github.com/OswaldHe/HMT-pytorch ../HMT-pytorch     # yourself
    pip install -e ".[published]"                                          # transformers, accelerate
    python -m hmt_plugin.bench vs-published --published-src ../HMT-pytorch

One random Llama is written as a Hugging Face checkpoint; the published code's
``RecurrentWrapper`` reads it through ``transformers.LlamaForCausalLM``, this project's
:class:`~hmt_plugin.modules.HMT` through torchtune's HF checkpointer, and the HMT parameters
(initial memory, summary token, recall projections) are copied from ours to theirs, so both
compute the same function on the same weights. Both sides read the same random document in
one process.

Nothing of the published code is shipped or copied: it is imported from ``--published-src``
at run time. Shims, active only while its code runs: ``Tensor.cuda`` returns the tensor itself
on a CPU run (its forward moves every segment to CUDA), ``evaluate.load`` returns None (its
constructor loads ROUGE/F1 metrics from the hub, which its language-model forward never
uses), and unless ``--published_recall bf16`` its recall projections run in float32 (the stock
code casts them to bfloat16), so the losses agree to float32 rounding.

It first runs one forward + backward on each side and refuses to time anything unless the
losses agree within ``--loss_tol``. Then, interleaved (one run of each variant per round,
medians reported):

* eval: the published forward under ``no_grad`` over a window of ``--eval_segments``
  segments; this project reading the same window (NLL of every token, as its eval does); and
  the bare backbone (``baseline`` mode) reading the same tokens segment by segment;
* training at each of ``--depths``: one step = forward + backward (loss on the last segment,
  the published loss) + AdamW, the published code against this project with its default
  path and with each speed/memory option (see ``--project_variants``).

Config S is the default: a random Llama with dim 256, 4 layers, 8 heads, FFN 688, vocab 8000;
segment_length 256 (222 new tokens + 32 sensory + 2 memory), cache 300, batch 2, 2 threads,
float32.
"""

import argparse
import contextlib
import copy
import importlib
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from hmt_plugin.bench.memory import PROBE_CHOICES, describe, make_probe
from hmt_plugin.bench.report import (
    BenchRun, apply_quick, header, machine_info, markdown_table, stderr,
)
from hmt_plugin.bench.speed import (
    Variant, cpu_clock, measure_interleaved, random_doc, read_streaming, train_step,
)
from hmt_plugin.checkpointing.published import PUBLISHED_KEYS
from hmt_plugin.checkpointing.tiny_checkpoint import tiny_llama_checkpointer, write_tiny_hf_llama
from hmt_plugin.modules.hmt import HMT
from hmt_plugin.modules.hmt_config import HMTConfig
from hmt_plugin.training.loss import batch_loss

CONFIG_S = dict(vocab_size=8000, num_layers=4, num_heads=8, num_kv_heads=8, embed_dim=256,
                intermediate_dim=688)
DIMS = tuple(CONFIG_S)
QUICK = dict(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
             intermediate_dim=128, segment_length=32, num_sensory=4, cache_size=4,
             depths=[3], eval_segments=3, repeats=1, threads=1)

# This project's training variants: name -> batch_loss options. ``project`` is a recipe step
# with the default config that is not logged (or any step with ``log_all_segments: false``);
# ``project_logged`` a logged one, which also computes the earlier segments' NLL for
# ``ppl_all_segments``; ``project_checkpointed`` adds ``segment_checkpointing: true``.
PROJECT_VARIANTS: Dict[str, Dict[str, bool]] = {
    "project": {"log_all_segments": False},
    "project_logged": {"log_all_segments": True},
    "project_checkpointed": {"log_all_segments": False, "checkpoint_segments": True},
}


class PublishedCodeError(RuntimeError):
    """The published code cannot be imported or run as this benchmark needs."""


# ---------------------------------------------------------------------------- the published side
def import_published(src: Path) -> types.ModuleType:
    """``modeling_rmt.language_modeling`` from a clone of OswaldHe/HMT-pytorch."""
    src = Path(src).expanduser().resolve()
    if not (src / "modeling_rmt" / "language_modeling.py").is_file():
        raise PublishedCodeError(
            f"--published-src {src} holds no modeling_rmt/language_modeling.py; point it at a "
            "clone of https://github.com/OswaldHe/HMT-pytorch."
        )
    for package in ("transformers", "accelerate", "sklearn"):
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise PublishedCodeError(
                f"the published code needs {package!r} ({err}); install the extra: "
                'pip install -e ".[published]"'
            ) from err
    if "evaluate" not in sys.modules:
        try:
            importlib.import_module("evaluate")
        except ImportError:
            # Imported at the top of its module for QA metrics its LM forward never uses.
            sys.modules["evaluate"] = types.ModuleType("evaluate")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    return importlib.import_module("modeling_rmt.language_modeling")


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    missing = object()
    saved = getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, saved)


def _same_tensor(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


@contextlib.contextmanager
def published_runtime(device: torch.device, fp32_recall: bool) -> Iterator[None]:
    """While the published code runs: ``.cuda()`` is a no-op on a CPU run, and with
    ``fp32_recall`` its ``.bfloat16()`` casts (only in the memory search) are too."""
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(_patched(torch.Tensor, "cuda", _same_tensor))
        if fp32_recall:
            stack.enter_context(_patched(torch.Tensor, "bfloat16", _same_tensor))
        yield


def build_published(lm: types.ModuleType, hf_dir: Path, ours: HMT, depth: int,
                    device: torch.device, fp32_recall: bool) -> torch.nn.Module:
    """The published ``RecurrentWrapper`` around ``hf_dir``'s Llama, as its
    ``tools/models.py`` builds full HMT, with our model's HMT parameters copied in."""
    from transformers import LlamaForCausalLM

    cfg = ours.config
    backbone = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                attn_implementation="sdpa")
    cell = lm.MemoryCell(backbone, num_mem_tokens=cfg.num_memory_tokens,
                         num_prepend=cfg.num_sensory)
    recall_dim = ours.recall.q_proj.weight.shape[0]
    no_metrics = types.SimpleNamespace(load=lambda *a, **k: None)
    with _patched(lm, "evaluate", no_metrics):
        wrapper = lm.RecurrentWrapper(
            cell, emb=copy.deepcopy(backbone.get_input_embeddings()),
            word_emb_dim=backbone.config.hidden_size, hidden_dim=recall_dim,
            ltm_context=cfg.cache_size, segment_size=cfg.tokens_per_segment,
            max_n_segments=depth, mask_size=cfg.tokens_per_segment, n_cell_out=5,
            segment_alignment=None,
        )
    if fp32_recall:
        wrapper.cross_attn.float()
    ours_hmt = ours.hmt_state_dict()
    theirs = {key: ours_hmt[name].detach().clone() for key, name in PUBLISHED_KEYS.items()}
    missing, unexpected = wrapper.load_state_dict(theirs, strict=False)
    if unexpected or any(k in missing for k in theirs):
        raise PublishedCodeError(f"the published wrapper did not take {sorted(theirs)}.")
    return wrapper.to(device)


def published_loss(wrapper: torch.nn.Module, tokens: torch.Tensor, cfg: HMTConfig,
                   device: torch.device, fp32_recall: bool) -> torch.Tensor:
    """The published forward on ``tokens`` (labels = tokens, all real): its training loss,
    cross-entropy over the last segment's targets."""
    with published_runtime(device, fp32_recall), warnings.catch_warnings():
        # Its forward scores token F1 with scikit-learn, which warns about absent classes.
        warnings.simplefilter("ignore")
        out, _ = wrapper(input_ids=tokens, labels=tokens, attention_mask=torch.ones_like(tokens),
                         segment_size=cfg.tokens_per_segment, sum_fraction=cfg.sum_fraction,
                         mode="train")
    return out["loss"]


def published_step(wrapper, tokens, cfg, device, fp32_recall, optimizer) -> torch.Tensor:
    """One published training step: zero_grad, forward, backward, AdamW, as its main.py."""
    optimizer.zero_grad(set_to_none=True)
    loss = published_loss(wrapper, tokens, cfg, device, fp32_recall)
    with published_runtime(device, fp32_recall):
        loss.backward()
    optimizer.step()
    return loss.detach()


def published_eval(wrapper, tokens, cfg, device, fp32_recall) -> torch.Tensor:
    with torch.no_grad():
        return published_loss(wrapper, tokens, cfg, device, fp32_recall)


# ---------------------------------------------------------------------------- this project
def build_project(hf_dir: Path, dims: Dict[str, int], config: HMTConfig, device: torch.device,
                  seed: int) -> HMT:
    """Our HMT over the same checkpoint, read by torchtune's HF checkpointer."""
    from torchtune.models.llama3 import llama3

    with tempfile.TemporaryDirectory() as out:
        state = tiny_llama_checkpointer(str(hf_dir), out, **dims).load_checkpoint()["model"]
    decoder = llama3(max_seq_len=config.segment_length, rope_base=10_000.0, **dims)
    decoder.load_state_dict(state)
    model = HMT(decoder, config)
    model.reset_hmt_parameters(torch.Generator().manual_seed(seed))
    return model.to(device)


def project_last_segment_loss(model: HMT, tokens: torch.Tensor) -> torch.Tensor:
    rows, width = tokens.shape
    batch = {"tokens": tokens, "labels": tokens, "seq_lens": torch.full((rows,), width)}
    loss = batch_loss(model, batch, tokens.device, "last")
    return loss.loss_sum / loss.num_tokens


# ---------------------------------------------------------------------------- checks
def check_same_loss(ours: float, theirs: float, tol: float, what: str) -> float:
    """|ours - theirs|; raises when it exceeds ``tol`` (timing different functions would
    compare nothing)."""
    diff = abs(float(ours) - float(theirs))
    if not diff <= tol:
        raise PublishedCodeError(
            f"{what}: this project's loss {float(ours):.8f} and the published code's "
            f"{float(theirs):.8f} differ by {diff:.3g} > --loss_tol {tol:g}; they do not compute "
            "the same function here, so nothing is timed. Check the published source's version "
            "and --published_recall (bf16 rounds the recall)."
        )
    return diff


def parity(model: HMT, wrapper, tokens, device, fp32_recall, tol) -> Dict[str, Any]:
    """One forward + backward on each side, from the same weights: losses and the gradient
    of the initial memory (every segment's gradient flows into it)."""
    cfg = model.config
    model.train()
    wrapper.train()
    model.zero_grad(set_to_none=True)
    wrapper.zero_grad(set_to_none=True)
    ours = project_last_segment_loss(model, tokens)
    ours.backward()
    theirs = published_loss(wrapper, tokens, cfg, device, fp32_recall)
    with published_runtime(device, fp32_recall):
        theirs.backward()
    diff = check_same_loss(ours.item(), theirs.item(), tol, "training loss")
    g_ours = model.initial_memory.grad.flatten()
    g_theirs = wrapper.memory_cell.memory.grad.flatten().to(g_ours)
    grad_rel = ((g_ours - g_theirs).norm() / g_ours.norm().clamp(min=1e-30)).item()
    model.zero_grad(set_to_none=True)
    wrapper.zero_grad(set_to_none=True)
    model.eval()
    wrapper.eval()
    with torch.no_grad():
        eval_ours = project_last_segment_loss(model, tokens).item()
    eval_theirs = published_eval(wrapper, tokens, cfg, device, fp32_recall).item()
    eval_diff = check_same_loss(eval_ours, eval_theirs, tol, "evaluation loss")
    return {"loss_project": ours.item(), "loss_published": theirs.item(), "loss_abs_diff": diff,
            "eval_loss_abs_diff": eval_diff,
            "initial_memory_grad_rel_diff": grad_rel}


# ---------------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    fp32_recall = args.published_recall == "fp32"
    lm = import_published(args.published_src)
    dims = {k: getattr(args, k) for k in DIMS}
    config = HMTConfig(segment_length=args.segment_length, num_sensory=args.num_sensory,
                       cache_size=args.cache_size, bptt_depth=max(args.depths + [args.eval_segments]),
                       recall_hidden_dim=args.recall_hidden_dim or args.embed_dim)
    probe = make_probe(args.memory_probe, device)
    results: Dict[str, Any] = {"parity": {}, "eval": {}, "train": [], "info": {
        "tokens_per_segment": config.tokens_per_segment, "summary_tokens": config.summary_tokens,
        "memory_probe": describe(probe),
        "cpu_clock": "thread_time" if cpu_clock() is time.thread_time else "process_time",
    }}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_hf_llama(Path(tmp) / "hf", seed=args.seed,
                                     max_seq_len=max(args.segment_length, 512), **dims)
        model = build_project(hf_dir, dims, config, device, args.seed)
        wrapper = build_published(lm, hf_dir, model, max(args.depths), device, fp32_recall)
    n_params = sum(p.numel() for p in model.parameters())
    results["info"]["project_parameters"] = n_params
    results["info"]["published_parameters"] = sum(p.numel() for p in wrapper.parameters())
    block = config.tokens_per_segment
    vocab = args.vocab_size

    check_doc = random_doc(vocab, max(args.depths) * block, args.batch_size, device, args.seed)
    stderr("checking that both sides compute the same loss")
    results["parity"] = parity(model, wrapper, check_doc, device, fp32_recall, args.loss_tol)
    stderr(f"  {results['parity']}")

    if args.eval_segments:
        doc = random_doc(vocab, args.eval_segments * block, args.batch_size, device, args.seed + 1)
        tokens = doc.numel()
        model.eval()
        wrapper.eval()

        def project_read(mode: str) -> Callable[[], torch.Tensor]:
            def read() -> torch.Tensor:
                model.set_mode(mode)
                try:
                    return read_streaming(model, doc, args.eval_segments + 1)
                finally:
                    model.set_mode("hmt")
            return read

        variants = [
            Variant("published", lambda: published_eval(wrapper, doc, config, device, fp32_recall), tokens),
            Variant("project", project_read("hmt"), tokens),
            Variant("bare_backbone", project_read("baseline"), tokens),
        ]
        stderr(f"eval: {args.eval_segments} segments x {args.batch_size} rows ({tokens} tokens)")
        cell = measure_interleaved(variants, device=device, probe=probe, repeats=args.repeats,
                                   budget_s=args.repeat_budget_s, rss=not args.no_rss)
        _ratios(cell, "published", ["project", "bare_backbone"])
        results["eval"] = {"segments": args.eval_segments, "tokens": tokens, **cell}

    for depth in args.depths:
        doc = random_doc(vocab, depth * block, args.batch_size, device, args.seed + depth)
        tokens = doc.numel()
        model.train()
        wrapper.train()
        opt_theirs = torch.optim.AdamW(wrapper.parameters(), lr=args.lr)
        opt_ours = torch.optim.AdamW(model.parameters(), lr=args.lr)
        variants = [Variant("published", lambda: published_step(
            wrapper, doc, config, device, fp32_recall, opt_theirs), tokens)]
        for name in args.project_variants:
            options = PROJECT_VARIANTS[name]
            variants.append(Variant(name, (lambda o=options: train_step(
                model, doc, "last", opt_ours, **o)), tokens))
        stderr(f"train: depth {depth} x {args.batch_size} rows ({tokens} tokens), "
               f"{', '.join(v.name for v in variants)}")
        cell = measure_interleaved(variants, device=device, probe=probe,
                                   repeats=args.train_repeats, budget_s=args.repeat_budget_s,
                                   rss=not args.no_rss)
        _ratios(cell, "published", list(args.project_variants))
        results["train"].append({"depth": depth, "tokens": tokens, **cell})
        del opt_theirs, opt_ours
        model.zero_grad(set_to_none=True)
        wrapper.zero_grad(set_to_none=True)
    return results


def _ratios(cell: Dict[str, Any], reference: str, names: Sequence[str]) -> None:
    """Per variant: speed-up over ``reference`` (its median time / the variant's, wall and
    CPU) and peak memory relative to it."""
    ref = cell.get(reference) or {}
    if ref.get("status") != "ok":
        return
    for name in names:
        res = cell.get(name) or {}
        if res.get("status") != "ok":
            continue
        res["speedup_wall"] = round(ref["median_s"] / res["median_s"], 3)
        if res.get("median_cpu_s"):
            res["speedup_cpu"] = round(ref["median_cpu_s"] / res["median_cpu_s"], 3)
        for key in ("rss_peak_mb", "peak_mb"):
            if res.get(key) and ref.get(key):
                res[f"{key}_ratio"] = round(res[key] / ref[key], 3)


# ---------------------------------------------------------------------------- output
def tables(record: Dict[str, Any]) -> str:
    results = record["results"]
    out = [f"## {record['benchmark']}\n\n{header(record)}\n"]
    p = results["parity"]
    out.append(f"Same function: training loss {p['loss_project']:.6f} (project) vs "
               f"{p['loss_published']:.6f} (published), |diff| {p['loss_abs_diff']:.2g}; eval "
               f"|diff| {p['eval_loss_abs_diff']:.2g}; initial-memory gradient relative diff "
               f"{p['initial_memory_grad_rel_diff']:.2g}.\n")
    heads = ["variant", "tok/s", "speed-up wall", "speed-up CPU", "RSS peak MiB", "RSS ratio",
             "tensor peak MiB", "tensor ratio"]

    def rows(cell: Dict[str, Any], names: Sequence[str]) -> List[List[Any]]:
        body = []
        for name in names:
            r = cell.get(name)
            if not r:
                continue
            if r.get("status") != "ok":
                body.append([name, r.get("status"), None, None, None, None, None, None])
                continue
            body.append([name, r["tokens_per_s"], r.get("speedup_wall"), r.get("speedup_cpu"),
                         r.get("rss_peak_mb"), r.get("rss_peak_mb_ratio"), r.get("peak_mb"),
                         r.get("peak_mb_ratio")])
        return body

    ev = results.get("eval")
    if ev:
        out.append(f"### Evaluation, {ev['segments']} segments, {ev['tokens']} tokens per read\n")
        out.append(markdown_table(heads, rows(ev, ["published", "project", "bare_backbone"])))
        a, b = ev.get("project", {}), ev.get("bare_backbone", {})
        if a.get("status") == "ok" and b.get("status") == "ok":
            out.append(f"\nProject / bare backbone time: wall {a['median_s'] / b['median_s']:.3f}, "
                       f"CPU {a['median_cpu_s'] / max(b['median_cpu_s'], 1e-9):.3f}.\n")
    for cell in results["train"]:
        out.append(f"### Training step (forward + backward + AdamW), {cell['depth']} segments, "
                   f"{cell['tokens']} tokens\n")
        names = ["published"] + [k for k in PROJECT_VARIANTS if k in cell]
        out.append(markdown_table(heads, rows(cell, names)))
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hmt_plugin.bench vs-published",
        description="This project against the published HMT code: same weights, same "
                    "document, one process, interleaved (config S by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--published-src", "--published_src", dest="published_src", required=True,
                   help="a clone of https://github.com/OswaldHe/HMT-pytorch (never copied)")
    p.add_argument("--published_recall", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: its recall projections in float32 (losses agree to fp32 "
                        "rounding); bf16: as the stock code runs them")
    g = p.add_argument_group("backbone (random Llama, config S)")
    for name, value in CONFIG_S.items():
        g.add_argument(f"--{name}", type=int, default=value)
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("HMT")
    g.add_argument("--segment_length", type=int, default=256)
    g.add_argument("--num_sensory", type=int, default=32)
    g.add_argument("--cache_size", type=int, default=300)
    g.add_argument("--recall_hidden_dim", type=int, default=None, help="default: embed_dim")
    g.add_argument("--batch_size", type=int, default=2)
    g = p.add_argument_group("what to time")
    g.add_argument("--eval_segments", type=int, default=6, help="0 skips the eval reads")
    g.add_argument("--depths", type=int, nargs="+", default=[6, 15],
                   help="training windows, in segments (BPTT through all of them)")
    g.add_argument("--project_variants", nargs="+", choices=sorted(PROJECT_VARIANTS),
                   default=list(PROJECT_VARIANTS))
    g.add_argument("--lr", type=float, default=1e-5, help="AdamW, both sides")
    g.add_argument("--loss_tol", type=float, default=1e-5,
                   help="refuse to time when the losses differ by more")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=5, help="timed eval rounds")
    g.add_argument("--train_repeats", type=int, default=5, help="timed training rounds")
    g.add_argument("--repeat_budget_s", type=float, default=300.0)
    g.add_argument("--memory_probe", choices=PROBE_CHOICES, default="auto")
    g.add_argument("--no_rss", action="store_true")
    g.add_argument("--quick", action="store_true",
                   help="a tiny model, one repeat: a dry run in seconds")
    g.add_argument("--out", default="outputs/bench/vs-published.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        apply_quick(args, argv, {**QUICK, "train_repeats": 1}, work_dir=None)
    for name in (*DIMS, "segment_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu")
    run_record = BenchRun("vs-published", argv)
    try:
        results = run(args)
    except PublishedCodeError as err:
        parser.exit(2, f"vs-published: {err}\n")
    settings = {k: v for k, v in vars(args).items() if k != "work_dir"}
    record = run_record.finish(args.out, tables, settings=settings, results=results,
                               machine=machine_info(args.device, "fp32"))
    return record
