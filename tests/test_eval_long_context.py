"""Long-context scoring on tiny models: the one-pass scorer against reading each T alone,
whole-document PPL, skipped documents, recall distances, peak memory, errors."""

import json

import pytest
import torch

from hmt_plugin.data import synthetic_recall_dataset
from hmt_plugin.eval.long_context import evaluate_long_context, format_long_context_table
from hmt_plugin.eval.memory import RSSProbe, TensorBytesProbe, memory_probe
from hmt_plugin.eval.plots import plot_ppl_vs_context, plot_recall_distance
from hmt_plugin.models import hmt_tiny

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, max_seq_len=64)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hmt_tiny(**SMALL).eval()


def docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_last_segment_nll(model, documents, t):
    """Each document cut to t tokens, read in one call; mean NLL of the last segment."""
    block = model.config.tokens_per_segment
    total, count = 0.0, 0
    for d in documents:
        if len(d) < t:
            continue
        x = torch.tensor([d[:t]])
        nll = model(x, labels=x, logits="none").nll[0]
        lo = max(1, ((t - 1) // block) * block)
        total += float(nll[lo:t].sum())
        count += t - lo
    return total / count, count


@pytest.mark.parametrize("mode", ["baseline", "rmt", "hmt"])
def test_one_pass_equals_reading_each_context_length_alone(model, mode):
    documents = docs([300, 150, 90, 200])
    ts = [20, 54, 100, 180]  # 54 = 3 whole hmt segments
    got = evaluate_long_context(
        model,
        documents,
        context_lengths=ts,
        mode=mode,
        batch_size=3,
        chunk_segments=2,
        memory="none",
    )
    assert model.config.mode == "hmt" and model.config.segment_length == 24  # restored
    # Another mode reads hmt's new tokens per segment (the default for comparisons).
    assert got.tokens_per_segment == model.config.tokens_per_segment
    model.set_mode(mode, keep_tokens_per_segment=True)
    try:
        for score in got.context:
            nll, count = naive_last_segment_nll(model, documents, score.context_length)
            assert score.tokens == count
            assert score.nll == pytest.approx(nll, rel=1e-5)
        with torch.no_grad():
            whole = [
                model(torch.tensor([d]), labels=torch.tensor([d]), logits="none").nll[0]
                for d in documents
            ]
    finally:
        model.set_mode("hmt", keep_tokens_per_segment=True)
    assert [s.skipped for s in got.context] == [0, 0, 1, 2]
    assert [s.documents for s in got.context] == [4, 4, 3, 2]
    assert got.document.tokens == sum(len(d) - 1 for d in documents)
    assert got.document.nll == pytest.approx(
        float(sum(w.sum() for w in whole)) / got.document.tokens, rel=1e-5
    )
    # Batching and chunking do not change the numbers.
    alone = evaluate_long_context(
        model,
        documents,
        context_lengths=ts,
        mode=mode,
        batch_size=1,
        chunk_segments=5,
        memory="none",
    )
    for a, b in zip(alone.context, got.context):
        assert a.nll == pytest.approx(b.nll, rel=1e-5)


def test_recall_distances_count_every_segment_read(model):
    documents = docs([200, 120])
    got = evaluate_long_context(model, documents, context_lengths=[50], mode="hmt", memory="none")
    block = model.config.tokens_per_segment
    segments = sum(-(-len(d) // block) for d in documents)
    assert got.no_recall == len(documents)  # first segments recall nothing
    assert sum(got.recall_distance.values()) == segments - len(documents)
    assert max(got.recall_distance) <= model.config.cache_size and min(got.recall_distance) >= 1
    rmt = evaluate_long_context(model, documents, context_lengths=[50], mode="rmt", memory="none")
    assert rmt.recall_distance == {} and rmt.no_recall == 0


def test_labelled_documents_are_scored_on_their_labels(model):
    documents = synthetic_recall_dataset(
        None, num_documents=4, tokens_per_segment=18, distance_segments=2, vocab_size=256, seed=0
    )
    got = evaluate_long_context(model, documents, context_lengths=[54], memory="none")
    answered = sum(
        int((documents.document_labels(i)[1:] != -100).sum()) for i in range(len(documents))
    )
    assert (
        got.document.tokens
        == answered
        < sum(len(documents.document_tokens(i)) - 1 for i in range(4))
    )


def test_peak_memory_stays_flat_as_context_grows(model):
    block = model.config.tokens_per_segment
    documents = docs([24 * block], seed=3)
    ts = [6 * block, 12 * block, 24 * block]
    got = evaluate_long_context(
        model, documents, context_lengths=ts, chunk_segments=2, memory="tensor_bytes"
    )
    peaks = [s.peak_memory_mb for s in got.context]
    assert all(p > 0 for p in peaks)
    assert peaks[-1] <= 1.02 * peaks[0]  # 4x the context, the same memory
    # The probe does see memory that grows: one call over the whole context.
    probe = TensorBytesProbe()
    sizes = []
    for t in (4 * block, 16 * block):
        x = torch.tensor([documents[0][:t]])
        with probe.measure() as reading, torch.no_grad():
            model(x, labels=x, logits="none")
        sizes.append(reading.peak_bytes)
    assert sizes[1] > 3 * sizes[0]


def test_memory_probes_measure_allocations():
    with TensorBytesProbe().measure() as reading:
        a = torch.ones(1000, dtype=torch.float32)
        b = a.view(10, 100)  # a view allocates nothing
        a.add_(1)  # nor does an in-place op
        del a, b
        torch.zeros(250, dtype=torch.float64)
    assert reading.peak_bytes == 4000
    with RSSProbe(interval_s=0.001).measure() as reading:
        block = torch.ones(32 * 2**20 // 4)  # 32 MB, touched
        del block
    assert reading.peak_bytes is not None and reading.peak_bytes >= 0
    assert memory_probe("auto", torch.device("cpu")).name == "tensor_bytes"
    with pytest.raises(ValueError, match="memory_probe='cuda' needs a CUDA device"):
        memory_probe("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        memory_probe("vram", torch.device("cpu"))


def test_table_and_plots(model, tmp_path):
    documents = docs([200, 120])
    results = [
        evaluate_long_context(model, documents, context_lengths=[30, 150], mode=mode, memory="none")
        for mode in ("baseline", "hmt")
    ]
    table = format_long_context_table(results)
    assert "baseline" in table and "doc PPL" in table and "T=150: 1" in table
    assert plot_ppl_vs_context(results, tmp_path / "ppl.png").stat().st_size > 1000
    assert plot_recall_distance(results, tmp_path / "hist.png").stat().st_size > 1000
    assert plot_recall_distance(results[:1], tmp_path / "none.png") is None

    # Results read back from JSON are the same results, and the quality benchmark draws the
    # same plots from its record.
    from hmt_plugin.bench.quality import write_plots
    from hmt_plugin.eval.long_context import LongContextResult

    as_json = json.loads(json.dumps([r.to_dict() for r in results]))
    assert [LongContextResult.from_dict(d) for d in as_json] == results
    record = {"results": {"eval": {r.label: d for r, d in zip(results, as_json)}}}
    written = write_plots(record, tmp_path / "bench")
    assert [p.name for p in written] == ["quality_ppl_vs_context.png", "quality_recall_distance.png"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(context_lengths=[500]),
            r"context_lengths \[500\] exceed the longest document \(300 tokens\)",
        ),
        (dict(context_lengths=[100], max_tokens=50), r"cut to max_tokens=50"),
        (dict(context_lengths=[]), "context_lengths is empty"),
        (dict(context_lengths=[1]), "integer >= 2"),
        (dict(context_lengths=[10], batch_size=0), "batch_size=0"),
    ],
)
def test_bad_arguments_are_named(model, kwargs, match):
    kwargs.setdefault("document_ppl", False)
    with pytest.raises(ValueError, match=match):
        evaluate_long_context(model, docs([300, 100]), memory="none", **kwargs)


def test_band_plot_styles_never_repeat():
    """The quality benchmark draws 12 readers: more lines than matplotlib's 10 default colours."""
    from hmt_plugin.eval.plots import line_styles

    for n in (3, 12, 25):
        styles = line_styles(n)
        assert len({(s["color"], s["marker"]) for s in styles}) == n
    assert len({s["color"] for s in line_styles(12)}) == 12  # colours alone tell 12 apart
