"""``python -m hmt_plugin.bench <name> [options]``: run one benchmark, write its JSON, print
its tables.

    speed       tokens/s and peak memory: HMT vs no memory vs full attention (CPU default)
    speed-gpu   the same on CUDA in bf16 with a Llama 3.2 1B-sized random backbone
    quality     pretrain a small Llama on books, fine-tune baseline / rmt / hmt, PPL by length;
                with --backbone DIR: a pretrained HF backbone (e.g. SmolLM2-135M), no pretraining,
                against no memory, a sliding window and full context on the same held-out tokens
    memory-diagnostic  what the carried memory is worth in a finished `quality --backbone` run,
                on its training books
    recall      synthetic long-range recall accuracy by distance, baseline / rmt / hmt
    quantized   full precision vs weight-only quantized HMT evaluation (tokens/s, memory)
    vs-published  this project against the published HMT code, same weights, interleaved
    gpu-check   one command for a GPU machine: bf16 speed, int4 eval, FSDP2 on NCCL, SmolLM2

``python -m hmt_plugin.bench <name> --help`` lists each one's options. Benchmarks are not
tests: they are run by hand, never in CI.
"""

import importlib
import sys
from typing import Optional, Sequence

# name -> (module, function)
COMMANDS = {
    "speed": ("hmt_plugin.bench.speed", "main"),
    "speed-gpu": ("hmt_plugin.bench.speed", "main_gpu"),
    "quality": ("hmt_plugin.bench.quality", "main"),
    "memory-diagnostic": ("hmt_plugin.bench.memory_diagnostic", "main"),
    "recall": ("hmt_plugin.bench.recall", "main"),
    "quantized": ("hmt_plugin.bench.quantized", "main"),
    "vs-published": ("hmt_plugin.bench.vs_published", "main"),
    "gpu-check": ("hmt_plugin.bench.gpu_check", "main"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown benchmark {name!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, function = COMMANDS[name]
    getattr(importlib.import_module(module_name), function)(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
