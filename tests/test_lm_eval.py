"""lm-eval harness on a tiny HMT model: each request type against a direct computation, and
local tasks (multiple choice, generation, rolling perplexity) through simple_evaluate offline."""

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from torchtune.models.llama2 import llama2_tokenizer  # noqa: E402

from hmt_plugin.eval.lm_eval_harness import HMTEvalWrapper, run_lm_eval  # noqa: E402
from hmt_plugin.generation import HMTGenerator  # noqa: E402
from hmt_plugin.models import hmt_tiny  # noqa: E402
from tests.assets import TEXT, write_sentencepiece  # noqa: E402

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=4, max_seq_len=64)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return llama2_tokenizer(
        str(write_sentencepiece(tmp_path_factory.mktemp("tok"), vocab_size=256))
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hmt_tiny(**SMALL).eval()


def request(*args):
    return SimpleNamespace(args=args)


LONG = (TEXT * 2).strip()  # about 6 segments of this tokenizer's tokens


# --------------------------------------------------------------------- request types
def test_loglikelihood_is_the_continuation_nll_of_one_read(model, tokenizer):
    lm = HMTEvalWrapper(model, tokenizer, progress=False, chunk_segments=2)
    reqs = [request(LONG, " the lazy dog"), request(LONG, " a single step"), request("", "Call me")]
    got = lm.loglikelihood(reqs)
    for req, (logprob, greedy) in zip(reqs, got):
        ctx, cont = lm.encode_pair(*req.args)
        assert len(ctx) + len(cont) > 1 and cont
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            out = model(ids, labels=ids, logits="all")
        want = -float(out.nll[0, len(ctx) :].sum())
        guess = out.logits[0, len(ctx) - 1 : -1].argmax(-1)
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == bool((guess == ids[0, len(ctx) :]).all())
    assert len(lm.tok_encode(LONG)) > 4 * model.config.tokens_per_segment


def test_encode_pair_moves_the_space_to_the_continuation(tokenizer, model):
    lm = HMTEvalWrapper(model, tokenizer, progress=False)
    ctx, cont = lm.encode_pair("The quick brown ", "fox")
    assert ctx == lm.tok_encode("The quick brown")
    assert ctx + cont == lm.tok_encode("The quick brown fox")


def test_loglikelihood_rolling_scores_every_token_once(model, tokenizer):
    lm = HMTEvalWrapper(model, tokenizer, progress=False, chunk_segments=1)
    (got,) = lm.loglikelihood_rolling([request(LONG)])
    ids = torch.tensor([lm.tok_encode(LONG)])
    with torch.no_grad():
        want = -float(model(ids, labels=ids, logits="none").nll.sum())
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_stops_at_strings_and_budget(model, tokenizer):
    lm = HMTEvalWrapper(model, tokenizer, progress=False)
    prompt = lm.tok_encode(LONG)
    greedy = HMTGenerator(model).generate(prompt, 40).sequences()[0]
    full = tokenizer.decode(greedy)
    (free,) = lm.generate_until([request(LONG, {"until": [], "max_gen_toks": 40})])
    assert free == full
    cut = full[3:6]  # a stop string that occurs in the greedy output
    (stopped,) = lm.generate_until([request(LONG, {"until": [cut], "max_gen_toks": 40})])
    assert stopped == full.split(cut)[0]
    (short,) = lm.generate_until([request(LONG, {"until": "\n\n", "max_gen_toks": 3})])
    assert short == tokenizer.decode(greedy[:3])


# --------------------------------------------------------------------- local tasks, offline
def _write_tasks(root):
    data = root / "data"
    data.mkdir()
    sentences = [s.strip() for s in TEXT.split(".") if s.strip()]
    mc = [
        {
            "question": s.rsplit(" ", 1)[0],
            "choices": [" " + s.rsplit(" ", 1)[1], " fox", " step"],
            "answer": 0,
        }
        for s in sentences
    ]
    gen = [{"prompt": s.rsplit(" ", 1)[0], "target": " " + s.rsplit(" ", 1)[1]} for s in sentences]
    text = [{"text": s + "."} for s in sentences]
    for name, rows in (("mc", mc), ("gen", gen), ("text", text)):
        (data / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
        "target_delimiter: ''\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (tasks / "tiny_text.yaml").write_text(
        f"task: tiny_text\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return tasks


def test_local_tasks_run_offline_through_simple_evaluate(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tasks = _write_tasks(tmp_path)
    lm = HMTEvalWrapper(model, tokenizer, progress=False)
    out = run_lm_eval(
        lm,
        tasks=["tiny_mc", "tiny_gen", "tiny_text"],
        include_path=str(tasks),
        include_defaults=False,
        limit=3,
    )
    res = out["results"]
    assert 0.0 <= res["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0
    assert res["tiny_text"]["word_perplexity,none"] > 1.0
    assert out["config"]["hmt_mode"] == "hmt"
    with pytest.raises(ValueError, match="not lm-eval tasks"):
        run_lm_eval(lm, tasks=["no_such_task"], include_path=str(tasks), include_defaults=False)
