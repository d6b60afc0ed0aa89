"""``hmt-tune convert``: checkpoint conversion from the command line.

    hmt-tune convert from-reference CKPT --hf_config CONFIG [--hparams case.json] [flags] -o OUT_DIR
    hmt-tune convert to-reference   OUR_DIR -o hmt.pt [--lora auto|merge|peft]
    hmt-tune convert export-hf      OUR_DIR -o HF_DIR
    hmt-tune convert to-meta        OUR_DIR -o META_DIR [--lora merge|keep]
    hmt-tune convert from-meta      META_DIR -o OUR_DIR [--hf_config CONFIG]

HMT settings for ``from-reference`` use the published code's names (``--segment_length``,
``--num_sensory``, ``--mem_recall_hidden_dim``, ``--mem_recall_context``, ``--hmt_stage_1``,
...), from a JSON file (``--hparams``, e.g. a reference case's ``case.json``) and/or flags;
flags win. Also runs as ``python -m hmt_plugin.checkpointing.convert_cli``.
"""

import argparse
import sys
from typing import Any, Dict, List, Optional

from hmt_plugin.checkpointing import convert
from hmt_plugin.checkpointing.io import DEFAULT_MAX_SHARD_SIZE, ConversionResult, HMTCheckpointError


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name_with_underscores`` (the published CLI's spelling) and ``--name-with-dashes``."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def _common(parser: argparse.ArgumentParser, *, shards: bool = True, directory_out: bool = True) -> None:
    parser.add_argument("input", help="the checkpoint to convert")
    parser.add_argument("-o", "--output", required=True, help="what to write")
    if directory_out:
        parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    if shards:
        _flag(parser, "max_shard_size", default=str(DEFAULT_MAX_SHARD_SIZE),
              help="largest backbone shard, bytes or e.g. 5GB (default 5 GiB)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and notes")


def _published_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HMT settings (the published code's names; override --hparams)")
    for name, kind in (("segment_length", int), ("num_sensory", int), ("mem_recall_hidden_dim", int),
                       ("mem_recall_context", int), ("bptt_depth", int), ("memory_size", int),
                       ("sum_fraction", float)):
        _flag(group, name, type=kind, default=None)
    for name in ("hmt_stage_1", "rmt_only", "baseline_only"):
        _flag(group, name, action="store_true", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmt-tune convert",
        description="Convert HMT checkpoints between the published HMT code's format, ours "
        "(HF backbone + hmt_model.safetensors + hmt_config.json), plain HF and Meta's format.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("from-reference", help="published HMT checkpoint -> our checkpoint directory")
    _common(p)
    _flag(p, "hf_config", default=None,
          help="the backbone's HF config.json (file or directory); required unless --hparams has hf_config")
    p.add_argument("--hparams", default=None, help="JSON of HMT settings in the published names (e.g. case.json)")
    _published_flags(p)
    p.add_argument("--lora", choices=("merge", "keep"), default="merge",
                   help="PEFT LoRA weights: merge into the backbone, or keep as a torchtune adapter")
    _flag(p, "lora_alpha", type=float, default=None,
          help="LoRA alpha of the published run (default: --hparams' lora_alpha or lora.alpha, else 32)")
    _flag(p, "lora_rank", type=int, default=None, help="LoRA rank, checked against the weights")
    _flag(p, "recall_dtype", choices=("auto", "model", "bfloat16", "float16", "float32"), default="auto",
          help="precision of the recall: auto (as the settings or the stored recall weights say; "
               "stock published checkpoints: bfloat16), model (the model's dtype), or a dtype")

    p = sub.add_parser("to-reference", help="our checkpoint directory -> published HMT state dict (.pt)")
    _common(p, shards=False, directory_out=False)
    p.add_argument("--lora", choices=("auto", "merge", "peft"), default="auto",
                   help="adapter: merge it, or write the PEFT layout of a published --use_lora run")
    _flag(p, "hparams_output", default=None, help="where to write the published settings JSON")

    p = sub.add_parser("export-hf", help="our checkpoint directory -> HF directory, LoRA merged")
    _common(p)

    p = sub.add_parser("to-meta", help="our checkpoint directory (Llama) -> consolidated.00.pth + params.json")
    _common(p, shards=False)
    p.add_argument("--lora", choices=("merge", "keep"), default="merge",
                   help="adapter: merge it, or copy its files beside")

    p = sub.add_parser("from-meta", help="Meta consolidated.00.pth (+ params.json) -> our checkpoint directory")
    _common(p)
    _flag(p, "hf_config", default=None, help="HF config.json to use (default: the one beside, or derived)")
    _flag(p, "max_seq_len", type=int, default=None, help="max_position_embeddings of a derived config")
    return parser


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    """The converter's keyword arguments for the parsed command line."""
    show = not args.quiet
    if args.command == "from-reference":
        flags = {k: getattr(args, k) for k in (
            "segment_length", "num_sensory", "mem_recall_hidden_dim", "mem_recall_context",
            "bptt_depth", "memory_size", "sum_fraction", "hmt_stage_1", "rmt_only", "baseline_only")}
        return dict(
            hf_config=args.hf_config, hparams=convert.published_args(args.hparams, **flags),
            lora=args.lora, lora_alpha=args.lora_alpha, lora_rank=args.lora_rank,
            recall_dtype=args.recall_dtype, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, show_progress=show,
        )
    if args.command == "to-reference":
        return dict(lora=args.lora, hparams_output=args.hparams_output, show_progress=show)
    if args.command == "export-hf":
        return dict(max_shard_size=args.max_shard_size, overwrite=args.overwrite, show_progress=show)
    if args.command == "to-meta":
        return dict(lora=args.lora, overwrite=args.overwrite, show_progress=show)
    return dict(hf_config=args.hf_config, max_seq_len=args.max_seq_len,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite, show_progress=show)


def _run(args: argparse.Namespace) -> ConversionResult:
    return convert.CONVERSIONS[args.command](args.input, args.output, **_options(args))


def main(argv: Optional[List[str]] = None) -> int:
    """Run one conversion; 0 on success, 1 with the reason on stderr on a bad input, 2 on a
    usage error (argparse)."""
    args = build_parser().parse_args(argv)
    try:
        result = _run(args)
    except (HMTCheckpointError, ValueError, FileNotFoundError) as err:
        print(f"hmt-tune convert {args.command}: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
    print(result.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
