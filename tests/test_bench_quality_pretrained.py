"""``python -m hmt_plugin.bench quality --backbone DIR --quick`` end to end on a tiny HF
checkpoint directory the test writes: every arm trains through the recipe, every reader scores
the same positions of the same held-out pieces, and the record, tables and plots are written.
The figures mean nothing at this size."""

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from hmt_plugin.bench import quality, quality_pretrained
from hmt_plugin.bench.runs import read_metrics
from tests.assets import TEXT, write_hf_tokenizer
from tests.hf_checkpoints import write_hf_checkpoint


def _books(root, n, words):
    root.mkdir(parents=True)
    vocab = TEXT.split()
    for i in range(n):
        body = " ".join(vocab[(i * 5 + j * 7) % len(vocab)] for j in range(words))
        (root / f"book_{i}.txt").write_text(f"Book {i}.\n\n{body}\n", encoding="utf-8")
    return root


@pytest.mark.slow
def test_quick_run_scores_the_same_positions_in_every_reader(tmp_path, capsys):
    backbone = write_hf_checkpoint(tmp_path / "model", "llama_tied_gqa", vocab_size=320,
                                   max_position_embeddings=512)
    write_hf_tokenizer(backbone, bos_in_template=False)
    books = _books(tmp_path / "books", 5, 700)
    work = tmp_path / "work"
    # Through the `quality` entry point, as a user calls it (conftest restores the threads).
    record = quality.main([
        "--backbone", str(backbone), "--books", str(books), "--quick", "--launcher",
        "inprocess", "--threads", "1", "--work_dir", str(work), "--max_seq_len", "512",
    ])
    res = record["results"]
    assert record["benchmark"] == "quality-pretrained"
    assert record["command"].startswith("python -m hmt_plugin.bench quality --backbone")
    assert set(res["data"]["train_books"]).isdisjoint(res["data"]["eval_books"])
    assert len(res["data"]["eval_books"]) == 2

    # Equal new tokens per segment in every arm; one token budget for every arm.
    sizes = res["sizes"]
    n = sizes["new_tokens_per_segment"]
    assert sizes["segment_length_by_mode"] == {"baseline": n, "rmt": n + 2, "hmt_stage1": n + 10,
                                               "hmt": n + 10}
    budgets = {name: r["train_tokens"] for name, r in res["runs"].items()}
    assert budgets["no_memory"] == budgets["rmt"] == budgets["hmt_stage1"] + budgets["hmt"]
    assert budgets["no_memory"] == sizes["train_tokens_per_arm"]
    # The full-context arm: the same budget to within half a step, in windows of one piece.
    full = res["runs"]["full_context"]
    # ... at its own batch (the quick preset's differs from the other arms', as on cuda).
    assert record["settings"]["full_context_batch_size"] < record["settings"]["batch_size"]
    assert full["tokens_per_step"] == (record["settings"]["full_context_batch_size"]
                                       * res["data"]["eval_tokens"])
    assert OmegaConf.load(work / "runs" / "full_context.yaml").batch_size == (
        record["settings"]["full_context_batch_size"])
    assert OmegaConf.load(work / "runs" / "rmt.yaml").batch_size == record["settings"]["batch_size"]
    assert full["steps"] == sizes["full_context_steps"]
    assert abs(budgets["full_context"] - budgets["no_memory"]) <= full["tokens_per_step"] / 2
    full_cfg = OmegaConf.load(work / "runs" / "full_context.yaml").model
    assert (full_cfg.mode, full_cfg.segment_length, full_cfg.bptt_depth) == (
        "baseline", res["data"]["eval_tokens"], 1)
    # Its reader loads those weights with the settings they were trained with.
    stamp = json.loads((work / "eval" / "full_context.json").read_text())["stamp"]
    assert stamp["run"] == "full_context" and stamp["model"]["segment_length"] == full_cfg.segment_length

    labels = [label for label, _, _ in quality_pretrained.READERS]
    assert list(res["eval"]["readers"]) == labels
    arrays = {}
    for label in labels:
        stem = label.replace(" ", "_").replace(",", "")
        arrays[label] = np.load(work / "eval" / f"{stem}.npy")
    shape = {a.shape for a in arrays.values()}
    assert shape == {(res["data"]["eval_pieces"], res["data"]["eval_tokens"])}
    for label, a in arrays.items():
        # Column 0 (no context) is the only unscored position, in every reader.
        assert np.isnan(a[:, 0]).all() and not np.isnan(a[:, 1:]).any(), label
        scored = res["eval"]["readers"][label]["all"]["tokens"]
        assert scored == res["data"]["scored_tokens_per_reader"], label
    # Different readers read differently; the recall ablation reads the stage-2 weights.
    assert not np.allclose(arrays["no memory"], arrays["sliding window"])
    assert not np.allclose(arrays["full context"], arrays["full context (untuned)"])
    # The gap closed comes from the readers' whole-piece NLL (gap_closed is tested below).
    nll = {label: r["all"]["nll"] for label, r in res["eval"]["readers"].items()}
    assert res["eval"]["gap_closed"] == quality_pretrained.gap_closed(nll)
    assert not np.allclose(arrays["hmt"], arrays["hmt, recall off"])
    # The stage-2 backbone read as a plain sliding window: other weights than the no-memory
    # arm's, and the memory's share of HMT's score is paired against it, piece by piece.
    assert not np.allclose(arrays["sliding window"], arrays["sliding window, hmt backbone"])
    assert not np.allclose(arrays["sliding window, hmt stage 1 backbone"],
                           arrays["sliding window, hmt backbone"])
    memory_share = res["eval"]["paired"]["sliding window, hmt backbone minus hmt"]
    assert len(memory_share["by_piece"]) == res["data"]["eval_pieces"]
    per_piece = np.nanmean(arrays["sliding window, hmt backbone"] - arrays["hmt"], axis=1)
    np.testing.assert_allclose(memory_share["by_piece"], per_piece)
    # ...and from the second segment on, where a memory has been carried.
    later = arrays["sliding window, hmt backbone"][:, n:] - arrays["hmt"][:, n:]
    np.testing.assert_allclose(memory_share["after_first_segment"]["nll_difference"],
                               later.mean(), rtol=1e-5)
    assert not np.allclose(arrays["hmt stage 1, step 0, published init"],
                           arrays["hmt stage 1, step 0, mean-embedding init"])
    distances = res["eval"]["readers"]["hmt"]["recall_distance"]
    assert sum(distances.values()) == res["data"]["eval_pieces"] * 4 and distances["-1"] == 2

    out = capsys.readouterr().out
    assert "Perplexity by position" in out and "Paired differences" in out
    assert (work / "quality_pretrained_ppl_by_position.png").stat().st_size > 0
    assert (work / "quality_pretrained_recall_distance.png").stat().st_size > 0
    assert json.loads((work / "quality.json").read_text())["results"]["eval"]["bands"]

    # The carried-memory diagnostic reads the trained models on training-book pieces.
    from hmt_plugin.bench import memory_diagnostic

    diag = memory_diagnostic.main(["--work_dir", str(work), "--pieces", "2"])
    # Training books only: the held-out ones stay for the benchmark's report.
    assert diag["settings"]["books"] == res["data"]["train_dir"] != res["data"]["eval_dir"]
    assert len(diag["settings"]["pieces_from"]) == 2
    for label in ("untuned, hmt_stage1", "hmt stage 1", "hmt, recall off"):
        r = diag["results"][label]
        assert r["carried"]["tokens"] == r["not_carried"]["tokens"] > 0
        assert r["memory_norm_median"] > 0 and r["embedding_norm_median"] > 0
        sim = r["similarity"]
        assert set(sim) == {"raw", "centred_neighbours", "centred_same_document",
                            "centred_across_documents", "shared_fraction"}
        assert all(-1.0 <= v <= 1.0 for v in sim.values()) and sim["shared_fraction"] > 0
    assert "Cosine between the written memories" in capsys.readouterr().out
    # --without_sensory: each model read again at k = 0, on the same scored tokens.
    bare = memory_diagnostic.main(["--work_dir", str(work), "--pieces", "2", "--without_sensory",
                                   "--out", str(tmp_path / "bare.json")])["results"]
    for label in ("untuned, hmt_stage1", "hmt stage 1", "hmt, recall off"):
        with_k, without = bare[label], bare[f"{label}, k=0"]
        assert (with_k["num_sensory"], without["num_sensory"]) == (8, 0)
        assert with_k == diag["results"][label]  # the model's own reading, unchanged
        for reading in ("carried", "not_carried"):
            assert without[reading]["tokens"] == with_k[reading]["tokens"]
        assert without["carried"] != with_k["carried"]
        worth = without["sensory_worth"]["nll_difference"]
        assert worth == pytest.approx(math.log(without["not_carried"]["ppl"])
                                      - math.log(with_k["not_carried"]["ppl"]), abs=1e-6)
    assert "What the sensory tokens are worth" in capsys.readouterr().out

    # --reuse: nothing is trained or read again, and the figures are the same.
    again = quality.main([
        "--backbone", str(backbone), "--books", str(books), "--quick", "--launcher",
        "inprocess", "--threads", "1", "--work_dir", str(work), "--max_seq_len", "512", "--reuse",
    ])
    assert all(r["wall_s"] is None for r in again["results"]["runs"].values())
    assert again["results"]["eval"]["readers"] == res["eval"]["readers"]

    # --seeds: the first seed is the run above (reused), each other one trains every arm
    # again in <work_dir>/seed<N>; the untuned readers are the same for every seed, read once.
    seeds = quality.main([
        "--backbone", str(backbone), "--books", str(books), "--quick", "--launcher",
        "inprocess", "--threads", "1", "--work_dir", str(work), "--max_seq_len", "512", "--reuse",
        "--seeds", "0", "1",
    ])["results"]
    assert seeds["eval"]["readers"] == res["eval"]["readers"]
    assert all(r["wall_s"] is not None for r in seeds["runs_by_seed"][1].values())
    spread = seeds["across_seeds"]
    assert spread["seeds"] == [0, 1]
    hmt_ppl = spread["ppl"]["hmt"]["by_seed"]
    assert hmt_ppl[0] == res["eval"]["readers"]["hmt"]["all"]["ppl"] != hmt_ppl[1]
    assert spread["ppl"]["hmt"]["sd"] > 0
    for label in ("no memory (untuned)", "sliding window (untuned)", "full context (untuned)"):
        assert spread["ppl"][label]["sd"] == 0, label
        assert not (work / "seed1" / "eval" / f"{label.replace(' ', '_')}.npy").exists()
    assert set(spread["paired"]) == set(res["eval"]["paired"])
    assert "Over training seeds 0, 1" in capsys.readouterr().out

    # The options outside the published function retrain the memory arms only; the sink
    # takes one more position in their calls, never a new token's place.
    opts = quality.main([
        "--backbone", str(backbone), "--books", str(books), "--quick", "--launcher",
        "inprocess", "--threads", "1", "--work_dir", str(work), "--max_seq_len", "512", "--reuse",
        "--memory_sink", "--memory_scale", "embedding",
    ])
    ran = {name for name, r in opts["results"]["runs"].items() if r["wall_s"] is not None}
    assert ran == {"rmt", "hmt_stage1", "hmt"}
    assert opts["results"]["sizes"]["segment_length_by_mode"] == {
        "baseline": n, "rmt": n + 3, "hmt_stage1": n + 11, "hmt": n + 11}
    readers = opts["results"]["eval"]["readers"]
    for label in ("no memory", "sliding window", "full context (untuned)"):
        assert readers[label] == res["eval"]["readers"][label], label
    for label in ("rmt", "hmt stage 1", "hmt"):
        assert readers[label]["all"]["tokens"] == res["data"]["scored_tokens_per_reader"]
        assert readers[label] != res["eval"]["readers"][label], label

    # Only the HMT arms, their parameters at their own learning rate (the recipe's hmt_lr).
    some = quality.main([
        "--backbone", str(backbone), "--books", str(books), "--quick", "--launcher",
        "inprocess", "--threads", "1", "--work_dir", str(work), "--max_seq_len", "512", "--reuse",
        "--memory_sink", "--memory_scale", "embedding", "--runs", "hmt_stage1", "hmt",
        "--hmt_lr", "1e-2", "--score_scale", "linear",
    ])
    assert set(some["results"]["runs"]) == {"hmt_stage1", "hmt"}
    assert all(r["wall_s"] is not None for r in some["results"]["runs"].values())
    readers = some["results"]["eval"]["readers"]
    assert "rmt" not in readers and "no memory" not in readers and "hmt, recall off" in readers
    assert "full context (untuned)" in readers
    configs = {n: OmegaConf.load(work / "runs" / f"{n}.yaml") for n in ("hmt_stage1", "hmt")}
    assert configs["hmt"].model.score_scale == "linear"  # only the mode that recalls
    assert "score_scale" not in configs["hmt_stage1"].model
    for name in ("hmt_stage1", "hmt"):
        logged = read_metrics(work / "runs" / name / "logs")
        # One schedule, two rates (the bench's --lr is 5e-5).
        assert logged and all(m["hmt_lr"] * 5e-5 == pytest.approx(m["lr"] * 1e-2, abs=1e-15)
                              for m in logged.values())

    # The diagnostic reads what such a run trained: no no-memory arm, so no sliding window.
    diag = memory_diagnostic.main(["--work_dir", str(work), "--pieces", "2"])
    assert set(diag["results"]) == {"untuned, hmt_stage1", "hmt stage 1", "hmt, recall off"}


def test_runs_hmt_needs_stage_1(tmp_path, capsys):
    backbone = write_hf_checkpoint(tmp_path / "model", "llama_tied_gqa", vocab_size=320,
                                   max_position_embeddings=512)
    with pytest.raises(SystemExit):
        quality.main(["--backbone", str(backbone), "--quick", "--runs", "hmt"])
    assert "add hmt_stage1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0", "0"], "repeats a seed"),
    (["--seed", "3", "--seeds", "0", "1"], "give --seed or --seeds"),
])
def test_refuses_ambiguous_seeds(tmp_path, capsys, flags, message):
    backbone = write_hf_checkpoint(tmp_path / "model", "llama_tied_gqa", vocab_size=320,
                                   max_position_embeddings=512)
    with pytest.raises(SystemExit):
        quality.main(["--backbone", str(backbone), "--quick", *flags])
    assert message in capsys.readouterr().err


def test_refuses_a_directory_without_config_json(tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality.main(["--backbone", str(tmp_path), "--quick"])
    assert "holds no config.json" in capsys.readouterr().err


def test_gap_closed_pairs_like_with_like():
    nll = {"no memory": 3.0, "no memory (untuned)": 3.4, "full context": 2.0,
           "full context (untuned)": 3.5, "hmt": 2.5, "sliding window": 2.75}
    gaps = quality_pretrained.gap_closed(nll)
    # Fine-tuned floor to fine-tuned top; the untuned top lies above this floor (no gap), and
    # an untuned floor is never measured to a fine-tuned top.
    assert gaps == {"hmt between no memory and full context": pytest.approx(0.5),
                    "sliding window between no memory and full context": pytest.approx(0.25)}
    nll["full context (untuned)"] = 2.6
    gaps = quality_pretrained.gap_closed({k: v for k, v in nll.items() if k != "full context"})
    assert gaps == {"hmt between no memory and full context (untuned)": pytest.approx(0.5 / 0.4),
                    "sliding window between no memory and full context (untuned)": pytest.approx(0.25 / 0.4),
                    "hmt between no memory (untuned) and full context (untuned)": pytest.approx(0.9 / 0.8),
                    "sliding window between no memory (untuned) and full context (untuned)":
                        pytest.approx(0.65 / 0.8)}


def test_presets_choose_the_runs_and_the_full_context_budget(tmp_path):
    backbone = write_hf_checkpoint(tmp_path / "model", "llama_tied_gqa", vocab_size=320,
                                   max_position_embeddings=512)
    base = ["--backbone", str(backbone)]
    cpu, cuda = quality_pretrained.parse(base), quality_pretrained.parse(base + ["--device", "cuda"])
    assert "full_context" not in cpu.runs and cuda.runs == list(quality_pretrained.RUNS)
    assert quality_pretrained.parse(base + ["--runs", "no_memory", "full_context"]).runs == [
        "no_memory", "full_context"]
    # On cuda the full-context arm keeps a smaller batch than the others (its logits).
    assert cuda.full_context_batch_size < cuda.batch_size
    assert quality_pretrained.parse(base + ["--device", "cuda", "--full_context_batch_size",
                                            "4"]).full_context_batch_size == 4
    cuda.runs.append("x")  # each parse has its own list, not the preset's
    assert quality_pretrained.parse(base + ["--device", "cuda"]).runs == list(quality_pretrained.RUNS)
    with pytest.raises(SystemExit):  # no abbreviation slips past the preset
        quality_pretrained.parse(base + ["--run", "hmt_stage1"])
    for args in (cpu, cuda):
        settings = quality_pretrained.Settings(args)
        per_step = args.full_context_batch_size * settings.eval_tokens
        assert abs(settings.full_context_steps * per_step - settings.train_tokens) <= per_step / 2
        assert settings.run_segment_length("full_context") == settings.eval_tokens
