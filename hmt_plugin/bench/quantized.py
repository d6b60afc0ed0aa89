"""Full precision against weight-only quantized HMT evaluation, at the same settings.

    python -m hmt_plugin.bench quantized                         # CPU, int8 weight-only
    python -m hmt_plugin.bench quantized --device cuda --dtype bf16 --scheme int4_weight_only

One randomly initialised backbone (a ``speed`` preset) wrapped with HMT reads one random
document of T tokens streaming, as ``hmt_eval`` does; a copy of the model with its backbone
quantized by :func:`hmt_plugin.eval.quantization.quantize_for_inference` (the recall
projections stay in full precision) reads the same document. Reported per T: tokens per
second and peak memory of both reads (measured side by side, rounds interleaved, as in
``speed``), the weights' bytes, and how far the quantized NLL is from the full-precision one.
"""

import argparse
import copy
from typing import Any, Dict, Optional, Sequence

import torch
from torchtune import training

from hmt_plugin.bench.memory import PROBE_CHOICES, describe, make_probe
from hmt_plugin.bench.report import BenchRun, header, machine_info, markdown_table, stderr
from hmt_plugin.bench.speed import (
    DIMS,
    DTYPES,
    PRESETS,
    Variant,
    _random_doc,
    backbone_dims,
    build_backbone,
    measure_interleaved,
    paired_ratio,
    read_streaming,
)
from hmt_plugin.eval.quantization import SCHEMES, quantize_for_inference
from hmt_plugin.modules.hmt import HMT
from hmt_plugin.modules.hmt_config import HMTConfig


def run_quantized(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dims = backbone_dims(args)
    probe = make_probe(args.memory_probe, device)
    config = HMTConfig(segment_length=args.segment_length, num_sensory=args.num_sensory,
                       cache_size=args.cache_size)
    stderr(f"building a random {args.preset} backbone {dims} on {device} ({args.dtype})")
    with training.set_default_dtype(dtype), device:
        full = HMT(build_backbone(dims, args.segment_length), config).eval()
    quant = copy.deepcopy(full)
    quantization = quantize_for_inference(quant, args.scheme)
    cells = []
    for length in sorted(set(args.lengths)):
        doc = _random_doc(dims["vocab_size"], length, 1, device, args.seed)
        variants = [
            Variant("full", lambda: read_streaming(full, doc, args.chunk_segments), length),
            Variant("quantized", lambda: read_streaming(quant, doc, args.chunk_segments), length),
        ]
        stderr(f"  T={length}")
        cell: Dict[str, Any] = {"length": length}
        cell.update(measure_interleaved(variants, device=device, probe=probe, repeats=args.repeats,
                                        budget_s=args.repeat_budget_s))
        a, b = cell["full"], cell["quantized"]
        if a.get("status") == "ok" and b.get("status") == "ok":
            cell["nll_per_token"] = {k: a["value"] / (length - 1) for k in ("full",)}
            cell["nll_per_token"]["quantized"] = b["value"] / (length - 1)
            cell["time_ratio_quantized_over_full"] = paired_ratio(b, a, "seconds")
        cells.append(cell)
    return {
        "quantization": quantization,
        "memory_probe": describe(probe),
        "backbone_parameters": sum(p.numel() for p in full.backbone.parameters()),
        "eval": cells,
    }


def tables(record: Dict[str, Any]) -> str:
    res, settings = record["results"], record["settings"]
    q = res["quantization"]
    rows = []
    for c in res["eval"]:
        a, b = c["full"], c["quantized"]
        nll = c.get("nll_per_token", {})
        rows.append([
            c["length"], a.get("tokens_per_s"), b.get("tokens_per_s"),
            c.get("time_ratio_quantized_over_full"), a.get("peak_mb"), b.get("peak_mb"),
            None if not nll else round(nll["full"], 4),
            None if not nll else round(nll["quantized"] - nll["full"], 4),
        ])
    weights = (
        f"weights: {q['weight_bytes_before'] / 2**20:.1f} MiB -> "
        f"{q['weight_bytes_after'] / 2**20:.1f} MiB ({q['quantized_layers']} linear layers, "
        f"{q['scheme']}; recall projections in full precision)"
    )
    return "\n".join([
        header(record),
        f"### {settings['dtype']} vs {q['scheme']}, segment_length {settings['segment_length']}",
        weights,
        "",
        markdown_table(
            ["tokens", f"{settings['dtype']} tok/s", "quantized tok/s", "time ratio",
             f"{settings['dtype']} peak MiB", "quantized peak MiB", "NLL/token", "NLL change"],
            rows,
        ),
        f"\nPeak memory: {res['memory_probe']}",
    ])


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hmt_plugin.bench quantized", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-13m")
    for name in DIMS:
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--scheme", choices=SCHEMES, default="int8_weight_only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment_length", type=int, default=1024)
    p.add_argument("--num_sensory", type=int, default=32)
    p.add_argument("--cache_size", type=int, default=300)
    p.add_argument("--lengths", type=int, nargs="+", default=[10000, 30000])
    p.add_argument("--chunk_segments", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeat_budget_s", type=float, default=120.0)
    p.add_argument("--memory_probe", choices=PROBE_CHOICES, default="auto")
    p.add_argument("--tiny", action="store_true", help="a dry run in seconds")
    p.add_argument("--out", default="outputs/bench/quantized.json")
    args = p.parse_args(list(argv))
    if args.tiny:
        args.preset, args.lengths, args.segment_length, args.num_sensory = "tiny", [300], 64, 8
        args.repeats, args.cache_size, args.chunk_segments = 1, 16, 4
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    run = BenchRun("quantized", argv)
    results = run_quantized(args)
    settings = dict(vars(args))
    settings["backbone"] = backbone_dims(args)
    record = run.finish(args.out, tables, settings=settings, results=results,
                        machine=machine_info(args.device, args.dtype))
    return record
