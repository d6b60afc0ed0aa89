"""The benchmarks run end to end at tiny sizes and write valid JSON. Not a benchmark: the
figures here mean nothing; ``python -m hmt_plugin.bench`` is run by hand."""

import json

import pytest
import torch

from hmt_plugin.bench import recall, speed


@pytest.fixture
def one_thread():
    # One thread: fast and steady on a busy machine; restored for the tests that follow.
    before = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(before)


def test_speed_and_recall_write_valid_json(tmp_path, one_thread, capsys):
    speed_json = tmp_path / "speed.json"
    speed.main(["--tiny", "--lengths", "120", "300", "--full_max_len", "200", "--profile",
                "always", "--profile_length", "120", "--no_rss", "--out", str(speed_json),
                *one_thread])
    record = json.loads(speed_json.read_text())
    assert record["benchmark"] == "speed" and record["command"].startswith("python -m hmt_plugin.bench speed")
    assert {"cpu_model", "torch", "device", "dtype"} <= set(record["machine"])
    assert len(record["load_avg_start"]) == 3 and record["wall_s"] > 0
    short, long = record["results"]["eval"]
    for name in ("hmt", "baseline", "full"):
        assert short[name]["status"] == "ok" and short[name]["tokens_per_s"] > 0
        assert short[name]["peak_mb"] > 0
    # One random model, one document: the three reads compute the same kind of NLL.
    nlls = [short[name]["nll_per_token"] for name in ("hmt", "baseline", "full")]
    assert max(nlls) - min(nlls) < 0.5
    assert long["full"]["status"].startswith("skipped") and long["ratio_hmt_over_baseline"] > 0
    (train,) = record["results"]["train"]
    assert train["hmt"]["status"] == "ok" and train["baseline"]["peak_mb"] > 0
    assert record["results"]["profile"]["64"]["hmt"]["phases_s"]
    assert "(a)/(b) time" in capsys.readouterr().out

    work = tmp_path / "recall"
    recall.main(["--quick", "--launcher", "inprocess", "--steps", "2", "--batch_size", "4",
                 "--distances", "0", "1", "--eval_documents", "8", "--work_dir", str(work),
                 *one_thread])
    record = json.loads((work / "recall.json").read_text())
    assert record["benchmark"] == "recall"
    accuracy = record["results"]["accuracy"]
    assert set(accuracy) == {"baseline", "rmt", "hmt", "hmt without recall"}
    assert all(0 <= accuracy[m][d]["accuracy"] <= 1 for m in accuracy for d in ("0", "1"))


def test_recall_on_a_pretrained_backbone_trains_on_text(tmp_path, one_thread, capsys):
    """``--backbone``: each mode fine-tunes the HF checkpoint on the pass-key text rendered by
    its tokenizer, with the same new tokens per segment (a sink adds a position, not a token),
    and is read on fresh text documents."""
    from omegaconf import OmegaConf

    from tests.assets import write_hf_tokenizer
    from tests.hf_checkpoints import write_hf_checkpoint

    backbone = write_hf_checkpoint(tmp_path / "model", "llama_tied_gqa", vocab_size=320,
                                   max_position_embeddings=512)
    write_hf_tokenizer(backbone, bos_in_template=False)
    work = tmp_path / "recall"
    record = recall.main(["--backbone", str(backbone), "--modes", "baseline", "hmt_stage1",
                          "--steps", "2", "--batch_size", "2", "--distances", "0", "1",
                          "--eval_documents", "4", "--segment_length", "120", "--num_sensory", "8",
                          "--memory_sink", "--max_seq_len", "512", "--launcher", "inprocess",
                          "--work_dir", str(work), *one_thread])
    res = record["results"]
    assert set(res["accuracy"]) == {"baseline", "hmt_stage1"} and res["chance"] == 1e-3
    assert res["metric"] == "exact_match" and "Exact pass keys" in capsys.readouterr().out
    assert {r["tokens_per_segment"] for r in res["runs"].values()} == {110}
    for mode in ("baseline", "hmt_stage1"):
        cfg = OmegaConf.load(work / "runs" / f"{mode}.yaml")
        assert cfg.model.backbone.checkpoint_dir == str(backbone)
        assert cfg.tokenizer.path == str(backbone) and "vocab_size" not in cfg.dataset
        assert cfg.model.get("memory_sink", False) == (mode == "hmt_stage1")
        for d in ("0", "1"):
            score = res["accuracy"][mode][d]
            assert score["documents"] == 4 and 0 <= score["exact_match"] <= score["accuracy"] <= 1
    with pytest.raises(SystemExit):
        recall.main(["--backbone", str(tmp_path), "--quick"])
    with pytest.raises(SystemExit):  # the sink exists only on the pretrained path
        recall.main(["--quick", "--memory_sink"])


def test_quantized_writes_valid_json(tmp_path, one_thread):
    from hmt_plugin.bench import quantized

    out = tmp_path / "quantized.json"
    quantized.main(["--tiny", "--out", str(out), *one_thread])
    record = json.loads(out.read_text())
    (cell,) = record["results"]["eval"]
    assert cell["full"]["tokens_per_s"] > 0 and cell["quantized"]["tokens_per_s"] > 0
    q = record["results"]["quantization"]
    assert q["scheme"] == "int8_weight_only" and q["weight_bytes_after"] < q["weight_bytes_before"]


def test_quality_budget_is_kept_under_reuse(tmp_path):
    """A re-run with --reuse takes the step plan it made before instead of re-measuring the
    speed, so an unchanged benchmark finds its configs unchanged and resumes its runs."""
    import argparse

    from hmt_plugin.bench.quality import budget_steps

    def never_built():
        raise AssertionError("the speed must not be measured again under --reuse")

    args = argparse.Namespace(work_dir=str(tmp_path), reuse=True, pretrain_steps=None,
                              pretrain_minutes=45.0)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "budget.json").write_text(
        json.dumps({"pretrain": {"steps": 1825, "seconds_per_step": 1.345}}))
    assert budget_steps(args, "pretrain", never_built, 16, 256, 1e-3) == (1825, 1.345)

    # An explicit step count that differs from the plan is a new plan: measured and saved.
    from hmt_plugin.models import hmt_tiny

    args.pretrain_steps = 7
    build = lambda: hmt_tiny(vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                             num_kv_heads=2, max_seq_len=16, mode="baseline",
                             segment_length=16, bptt_depth=1)
    steps, per_step = budget_steps(args, "pretrain", build, 2, 16, 1e-3)
    assert steps == 7 and per_step > 0
    saved = json.loads((tmp_path / "runs" / "budget.json").read_text())
    assert saved["pretrain"]["steps"] == 7


def test_quality_runs_end_to_end_and_scores_full_segments(tmp_path):
    """The quality benchmark at --quick sizes on books the test writes: every reader gets a
    score per T, every mode reads HMT's new tokens per segment and scores a full last segment
    (T cut to whole segments), and the tables and plots are written."""
    import random

    from hmt_plugin.bench import quality
    from hmt_plugin.modules.hmt_config import HMTConfig

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnoprstuvw") for _ in range(rng.randint(2, 8)))
             for _ in range(600)]
    books = tmp_path / "books"
    books.mkdir()
    for b in range(5):
        sentences = (" ".join(rng.choices(words, k=rng.randint(5, 14))).capitalize() + "."
                     for _ in range(400))
        (books / f"book_{b}.txt").write_text("\n".join(sentences))
    record = quality.main(["--books", str(books), "--quick", "--launcher", "inprocess",
                           "--work_dir", str(tmp_path / "work"), "--threads", "1"])
    res, settings = record["results"], record["settings"]
    assert set(res["eval"]) == {"pretrained backbone (no memory)", "baseline", "rmt",
                                "hmt stage 1", "hmt", "hmt without recall"}
    # Every mode reads HMT's new tokens per segment, so every reader reads the same T.
    tps = HMTConfig(segment_length=settings["segment_length"], mode="hmt",
                    num_sensory=settings["num_sensory"]).tokens_per_segment
    reads = {tuple(res["context_lengths_read"][label]) for label in res["eval"]}
    assert len(reads) == 1
    for label in res["eval"]:
        read = res["context_lengths_read"][label]
        assert len(read) == len(res["context_lengths"])
        assert all(t % tps == 0 and abs(t - n) < tps for t, n in zip(read, res["context_lengths"]))
        for score in res["eval"][label]["context"]:
            # a full last segment: tps targets per document (tps - 1 when T is one segment)
            assert score["tokens"] >= score["documents"] * (tps - 1) > 0
    assert (tmp_path / "work" / "quality_ppl_vs_context.png").is_file()
