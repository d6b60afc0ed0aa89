"""Mode comparisons at equal segments, the published code's test PPL against a plain
re-statement of it, and every shipped eval config scoring whole segments."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hmt_plugin.eval.long_context import (
    LongContextResult,
    evaluate_long_context,
    evaluate_published_test_ppl,
    misaligned_context_lengths,
)
from hmt_plugin.eval.scoring import score_mode
from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules import HMTConfig

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, max_seq_len=64)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hmt_tiny(**SMALL).eval()


def docs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------- equal segments
def test_with_mode_keeps_the_new_tokens_per_segment():
    hmt = HMTConfig(segment_length=256, num_sensory=32)
    assert hmt.tokens_per_segment == 222
    for mode, length in (("baseline", 222), ("rmt", 224), ("hmt_stage1", 256), ("hmt", 256)):
        other = hmt.with_mode(mode, keep_tokens_per_segment=True)
        assert (other.mode, other.segment_length, other.tokens_per_segment) == (mode, length, 222)
    # Without it a mode means what it always meant for a segment_length (checkpoints keep
    # reading the same tokens).
    assert hmt.with_mode("baseline").tokens_per_segment == 256
    assert hmt.with_mode("rmt").tokens_per_segment == 254
    # There and back again.
    back = hmt.with_mode("baseline", keep_tokens_per_segment=True).with_mode("hmt", keep_tokens_per_segment=True)
    assert back == hmt


@pytest.mark.parametrize("mode", ["baseline", "rmt", "hmt_stage1"])
def test_modes_compared_score_the_same_tokens(model, mode):
    """A comparison reads every mode in hmt's segments: the same targets scored at every T,
    and the segmentation is that of a model built in that mode with the adjusted length."""
    documents = docs([200, 130])
    ts = [54, 100]  # 54 = 3 hmt segments of 18; 100 is not whole, and warns
    ours = evaluate_long_context(model, documents, context_lengths=ts, mode="hmt", memory="none")
    other = evaluate_long_context(model, documents, context_lengths=ts, mode=mode, memory="none")
    assert other.tokens_per_segment == ours.tokens_per_segment == 18
    assert [s.tokens for s in other.context] == [s.tokens for s in ours.context]
    assert other.document.tokens == ours.document.tokens
    assert model.config.segment_length == 24 and model.config.mode == "hmt"
    # The same weights built directly in that mode with the adjusted segment length.
    direct = hmt_tiny(**{**SMALL, "segment_length": model.config.with_mode(mode, keep_tokens_per_segment=True).segment_length},
                      mode=mode)
    direct.load_state_dict({k: v for k, v in model.state_dict().items() if k in direct.state_dict()})
    again = evaluate_long_context(direct.eval(), documents, context_lengths=ts, memory="none")
    assert [s.nll for s in again.context] == pytest.approx([s.nll for s in other.context], rel=1e-6)
    # The old meaning is still there when asked for.
    own = evaluate_long_context(model, documents, context_lengths=ts, mode=mode, memory="none",
                                keep_tokens_per_segment=False)
    assert own.tokens_per_segment == model.config.with_mode(mode).tokens_per_segment


def test_score_mode_compares_at_equal_segments(model):
    documents = docs([90, 90])  # score_mode reads equal-length task documents
    scores = {m: score_mode(model, documents, mode=m, batch_size=2) for m in ("baseline", "hmt")}
    assert scores["baseline"].tokens == scores["hmt"].tokens
    assert model.config.segment_length == 24


def test_misaligned_context_length_warns_with_the_aligned_value(model, caplog):
    assert misaligned_context_lengths([2000, 1998], 222) and "T=1998 or T=2220" in misaligned_context_lengths([2000], 222)[0]
    assert misaligned_context_lengths([1998, 2220], 222) == []
    with caplog.at_level(logging.WARNING):
        evaluate_long_context(model, docs([120]), context_lengths=[40, 54], memory="none", document_ppl=False)
    assert "T=40" in caplog.text and "T=36 or T=54" in caplog.text and "T=54 ends" not in caplog.text


# ----------------------------------------------------------------------------- the published test PPL
@torch.no_grad()
def published_test_ppl_by_hand(model, documents, test_length, batch_size, test_step=None):
    """The published test loop, stated plainly: one stream, windows stream[max(0, i-L) : i+T]
    for i = 0, L, 2L, ...; each window read alone in one call; the last L labels scored (all
    but the first if the window holds <= L); full batches only; mean of exp(batch loss)."""
    L = model.config.tokens_per_segment
    stream = [t for d in documents for t in d]
    windows = [stream[max(0, i - L): i + test_length] for i in range(0, len(stream), L)]
    n_batches = len(windows) // batch_size
    if test_step is not None:
        n_batches = min(n_batches, test_step)
    ppls = []
    for k in range(n_batches):
        losses = []
        for w in windows[k * batch_size:(k + 1) * batch_size]:
            x = torch.tensor([w])
            nll = model(x, labels=x, logits="none").nll[0]
            mask_size = L if len(w) > L else len(w) - 1
            losses.append(nll[len(w) - mask_size:])
        ppls.append(float(torch.cat(losses).mean().exp()))
    return float(np.mean(ppls)), n_batches


@pytest.mark.parametrize("mode", ["hmt", "baseline"])
@pytest.mark.parametrize("test_length, batch_size, test_step", [(54, 2, None), (40, 3, 4), (10, 1, None)])
def test_published_test_ppl_equals_its_plain_statement(model, mode, test_length, batch_size, test_step):
    documents = docs([150, 61, 90], seed=3)
    (got,) = evaluate_published_test_ppl(model, documents, test_lengths=[test_length], batch_size=batch_size,
                                         test_step=test_step, mode=mode, chunk_segments=2)
    model.set_mode(mode, keep_tokens_per_segment=True)
    try:
        expected, batches = published_test_ppl_by_hand(model, documents, test_length, batch_size, test_step)
    finally:
        model.set_mode("hmt", keep_tokens_per_segment=True)
    assert got.batches == batches and got.tokens_per_segment == 18
    assert got.ppl == pytest.approx(expected, rel=1e-5)
    assert got.ppl >= got.token_ppl * (1 - 1e-6)  # a mean of exponentials >= exp of the mean
    assert model.config.segment_length == 24
    back = LongContextResult.from_dict(LongContextResult("x", mode, 18, published_test=[got]).to_dict())
    assert back.published_test == [got]


def test_published_test_ppl_bad_input(model):
    with pytest.raises(ValueError, match="fewer than one batch of batch_size=64"):
        evaluate_published_test_ppl(model, docs([50]), test_lengths=[20], batch_size=64)
    with pytest.raises(ValueError, match="test_step"):
        evaluate_published_test_ppl(model, docs([50]), test_lengths=[20], test_step=0)


# ----------------------------------------------------------------------------- shipped configs
def _eval_configs():
    return sorted(CONFIGS.glob("*/hmt_eval*.yaml"))


@pytest.mark.parametrize("path", _eval_configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_eval_config_scores_whole_segments(path):
    """Every run of the config (each mode, read at the model's new tokens per segment) scores
    a whole last segment at every T it ships with, and with the published test lengths."""
    cfg = OmegaConf.load(path)
    model = OmegaConf.to_container(cfg.model, resolve=False)
    settings = {k: model[k] for k in ("segment_length", "num_sensory", "num_memory_tokens", "mode") if k in model}
    base = HMTConfig(**settings)
    runs = [r.get("mode") or base.mode for r in cfg.get("runs") or []] or list(cfg.get("modes") or [base.mode])
    keep = cfg.get("keep_tokens_per_segment", True)
    assert keep, f"{path}: comparisons across modes must keep the new tokens per segment"
    ts = list(cfg.get("context_lengths") or [])
    published = cfg.get("published_test_ppl") or {}
    ts += list(published.get("test_lengths") or [])
    assert ts, f"{path} scores no context length"
    for mode in runs:
        tps = base.with_mode(mode, keep_tokens_per_segment=True).tokens_per_segment
        assert misaligned_context_lengths(ts, tps) == [], (path, mode)
