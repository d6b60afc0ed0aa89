"""What the carried memory is worth in the models a ``quality --backbone`` run trained, read on
pieces of its *training* books (never the held-out ones the benchmark reports on):

    python -m hmt_plugin.bench memory-diagnostic --work_dir outputs/bench/quality-smollm2-135m

For the stage-1 and stage-2 models (the latter with recall off) and the untuned backbone in
``hmt_stage1`` mode, each read twice on the same tokens: as trained, and with every segment
given the learned first-segment memory instead of the memory its predecessor wrote
(``carry_memory=False``: the same sensory tokens and layout, nothing carried). The sliding
window of the no-memory arm is read beside them, and the norm of the memories each model
writes beside that of the token embeddings. A carried memory that helps makes the first
reading better than the second. The memories each model writes over the pieces are also
compared with one another (:func:`~hmt_plugin.eval.memory_similarity.memory_similarity`): a
memory that carries its segment is closer to its neighbours than to other documents' memories.
With ``--without_sensory`` each model is read again with no sensory tokens (``k = 0``, the same
new tokens and scored positions): what the memory is worth there, and what the sensory tokens
are worth, show how much of the memory's content the sensory tokens already carry.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from hmt_plugin.bench import quality_pretrained as qp
from hmt_plugin.bench.report import BenchRun, machine_info, markdown_table, stderr


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from hmt_plugin.eval.token_nll import band_scores, paired_difference, window_token_nll

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m hmt_plugin.bench memory-diagnostic")
    p.add_argument("--work_dir", required=True, help="a finished `quality --backbone` work dir")
    p.add_argument("--pieces", type=int, default=4, help="training books read, one piece each")
    p.add_argument("--without_sensory", action="store_true",
                   help="read each model again with no sensory tokens (k = 0, the same new tokens)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bench_run = BenchRun("memory-diagnostic", argv)  # from the start: its wall time covers the reads
    work = Path(args.work_dir)
    record = json.loads((work / "quality.json").read_text())
    # The parser's defaults under the recorded settings: a record older than a flag still reads.
    defaults = vars(qp.build_parser().parse_args(["--backbone", record["settings"]["backbone"]]))
    bench = argparse.Namespace(**{**defaults, **record["settings"]})
    bench.reuse, bench.work_dir = True, str(work)
    settings = qp.Settings(bench)
    train_dir = Path(record["results"]["data"]["train_dir"])
    pieces, names = qp.eval_pieces(bench, settings, train_dir, work / "token_cache")
    pieces = pieces[: args.pieces]
    block = settings.new_tokens
    # A run made with --runs reads the models it trained (the untuned backbone always).
    trained = set(record["settings"].get("runs") or qp.RUNS)
    readers = [
        (label, run, mode) for label, run, mode in (
            ("untuned, hmt_stage1", None, "hmt_stage1"),
            ("hmt stage 1", "hmt_stage1", "hmt_stage1"),
            ("hmt, recall off", "hmt", "hmt_stage1"),
        ) if run is None or run in trained
    ]
    results, rows, similarity_rows = {}, [], []
    for label, run, mode in readers:
        model = qp.load_reader_model(bench, settings, work, run, mode)
        if model.config.mode != mode:
            model.set_mode(mode, keep_tokens_per_segment=True)
        readings = {}
        readings[label], not_carried = read_memory(model, pieces, settings, bench.eval_batch_size)
        built_sensory = model.config.num_sensory
        if args.without_sensory and built_sensory:
            # The same model at k = 0: the same new tokens and scored positions, so the pairs
            # say what the memory carries apart from the sensory tokens, and what they carry.
            model.set_num_sensory(0)
            bare, bare_not_carried = read_memory(model, pieces, settings, bench.eval_batch_size)
            model.set_num_sensory(built_sensory)
            # Neither sensory tokens nor a carried memory, against the sensory tokens alone.
            bare["sensory_worth"] = paired_difference(not_carried, bare_not_carried, block)
            readings[f"{label}, k=0"] = bare
        del model
        for name, r in readings.items():
            results[name] = r
            diff = r["not_carried_minus_carried"]
            rows.append([name, r["carried"]["ppl"], r["not_carried"]["ppl"],
                         round(diff["nll_difference"], 4), round(diff["nll_difference_se"], 4),
                         round(r["memory_norm_median"], 2), round(r["embedding_norm_median"], 2),
                         round(r["initial_memory_norm"], 2)])
            similarity_rows.append([name] + [round(v, 3) for v in r["similarity"].values()])
    if "no_memory" in trained:
        model = qp.load_reader_model(bench, settings, work, "no_memory", "baseline")
        sliding = window_token_nll(model.backbone, pieces, window=settings.sliding_window,
                                   stride=settings.new_tokens, batch_size=4 * bench.eval_batch_size)
        label = "sliding window (no-memory arm)"
        results[label] = band_scores(sliding, [(1, settings.eval_tokens)], block)[0].to_dict()
        rows.append([label, results[label]["ppl"], None, None, None, None, None, None])
    table = markdown_table(["reader (training-book pieces)", "PPL, memory carried",
                            "PPL, memory not carried", "NLL not carried - carried", "s.e.",
                            "written memory norm (median)", "embedding norm (median)",
                            "first memory norm"], rows)
    sensory = [[name, round(r["sensory_worth"]["nll_difference"], 4),
                round(r["sensory_worth"]["nll_difference_se"], 4)]
               for name, r in results.items() if "sensory_worth" in r]
    if sensory:
        table += "\n\nWhat the sensory tokens are worth (memory not carried: NLL at k = 0 minus at k)\n\n"
        table += markdown_table(["reader (training-book pieces)", "NLL difference", "s.e."], sensory)
    table += "\n\nCosine between the written memories (centred: after subtracting their mean)\n\n"
    table += markdown_table(["reader (training-book pieces)", "raw", "centred, neighbours",
                             "centred, same document", "centred, across documents",
                             "shared fraction"], similarity_rows)
    return bench_run.finish(args.out or work / "memory_diagnostic.json", lambda record: table,
                      settings={**vars(args), "books": str(train_dir), "pieces_from": names[: args.pieces]},
                      results=results, machine=machine_info(bench.device, bench.dtype))


def read_memory(model, pieces, settings: "qp.Settings",
                batch_size: int) -> Tuple[Dict[str, Any], np.ndarray]:
    """One model read twice on ``pieces``: carrying each segment's memory to the next, and
    giving every segment the learned first memory instead. Returns the scores, with the
    norms and cosines of the memories it wrote, and the second reading's per-token NLL."""
    from hmt_plugin.eval.memory_similarity import memory_similarity
    from hmt_plugin.eval.token_nll import band_scores, hmt_token_nll, paired_difference

    block, whole = settings.new_tokens, [(1, settings.eval_tokens)]
    stderr(f"reading k={model.config.num_sensory} with and without the carried memory")
    written = []  # the memories of the carried reading, from the same calls
    carried = hmt_token_nll(model, pieces, batch_size=batch_size, memories=written)
    replaced = hmt_token_nll(model, pieces, batch_size=batch_size, carry_memory=False)
    written = torch.cat(written).float()
    return {
        "num_sensory": model.config.num_sensory,
        # What the next segment gets at position 0, against what it was pretrained on.
        "memory_norm_median": written.norm(dim=-1).median().item(),
        "embedding_norm_median": model.backbone.tok_embeddings.weight.detach().float()
        .norm(dim=-1).median().item(),
        "initial_memory_norm": model.initial_memory.detach().float().norm(dim=-1).max().item(),
        "carried": band_scores(carried, whole, block)[0].to_dict(),
        "not_carried": band_scores(replaced, whole, block)[0].to_dict(),
        "not_carried_minus_carried": paired_difference(carried, replaced, block),
        "similarity": memory_similarity(written),
    }, replaced
