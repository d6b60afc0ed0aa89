"""Per-token NLL readers: the same scored positions in every reader, exact agreement where
two readers compute the same thing, and block standard errors."""

import numpy as np
import pytest
import torch

from hmt_plugin.eval.token_nll import band_scores, hmt_token_nll, paired_difference, window_token_nll
from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers


@pytest.fixture(scope="module")
def pieces():
    return torch.randint(0, 256, (3, 60), generator=torch.Generator().manual_seed(0)).tolist()


def _model(mode, **kw):
    torch.manual_seed(0)
    model = hmt_tiny(mode=mode, max_seq_len=128, **kw)
    model.reset_hmt_parameters()
    return model.eval()


def test_full_window_equals_one_baseline_segment(pieces):
    model = _model("baseline", segment_length=60)
    a = hmt_token_nll(model, pieces)
    b = window_token_nll(model.backbone, pieces, window=60, stride=60)
    assert np.isnan(a[:, 0]).all() and np.isnan(b[:, 0]).all()
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], rtol=0, atol=1e-5)


def test_sliding_window_scores_each_chunk_from_its_own_window(pieces):
    model = _model("baseline", segment_length=60)
    nll = window_token_nll(model.backbone, pieces, window=20, stride=16)
    assert not np.isnan(nll[:, 1:]).any()
    # Token 40 lies in chunk 32..47, read by the window 28..47.
    ids = torch.tensor(pieces)[:, 28:48]
    logits = project(model.backbone, run_layers(model.backbone, embed_tokens(model.backbone, ids)))
    expected = torch.nn.functional.cross_entropy(logits[:, 11], ids[:, 12], reduction="none")
    np.testing.assert_allclose(nll[:, 40], expected.detach().numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="window=16 must be larger than stride=16"):
        window_token_nll(model.backbone, pieces, window=16, stride=16)


def test_hmt_reader_does_not_depend_on_call_size_and_counts_recalls(pieces):
    model = _model("hmt", segment_length=24, num_sensory=4)
    counts_a, counts_b = {}, {}
    a = hmt_token_nll(model, pieces, chunk_segments=1, batch_size=1, recall_distances=counts_a)
    b = hmt_token_nll(model, pieces, chunk_segments=16, batch_size=3, recall_distances=counts_b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    segments = 3 * -(-60 // model.config.tokens_per_segment)
    assert counts_a == counts_b and sum(counts_a.values()) == segments
    assert counts_a[-1] == 3  # each piece's first segment has nothing to recall


def test_hmt_reader_collects_the_memories_one_call_writes(pieces):
    model = _model("hmt_stage1", segment_length=24, num_sensory=4)
    written = []
    hmt_token_nll(model, pieces, chunk_segments=1, batch_size=2, memories=written)
    assert [m.shape[0] for m in written] == [2, 1]  # one tensor per batch of pieces
    with torch.inference_mode():
        whole = model(torch.tensor(pieces), logits="none").memories
    torch.testing.assert_close(torch.cat(written), whole, rtol=0, atol=1e-5)


def test_band_scores_and_paired_difference():
    nll = np.full((2, 9), np.nan)
    nll[:, 1:] = [[1, 1, 1, 2, 2, 2, 3, 3], [1, 1, 1, 2, 2, 2, 3, 5]]
    (whole,) = band_scores(nll, [(1, 9)], block=3)
    assert whole.tokens == 16 and whole.nll == pytest.approx(nll[:, 1:].mean())
    assert whole.ppl == pytest.approx(np.exp(whole.nll)) and whole.ppl_low < whole.ppl < whole.ppl_high
    first, last = band_scores(nll, [(1, 4), (6, 9)], block=3)
    assert first.nll == pytest.approx(1.0) and first.nll_se == pytest.approx(0.0)
    assert last.tokens == 6 and last.nll == pytest.approx(18 / 6)
    d = paired_difference(nll, nll + 0.5, block=3)
    assert d["nll_difference"] == pytest.approx(0.5) and d["nll_difference_se"] == pytest.approx(0)
    with pytest.raises(ValueError, match="no scored token"):
        band_scores(nll, [(0, 1)], block=3)
    with pytest.raises(ValueError, match="equal-length"):
        window_token_nll(None, [[1, 2, 3], [1, 2]], window=4, stride=2)


def test_memory_not_carried_reads_each_segment_as_a_first_one(pieces):
    model = _model("rmt", segment_length=22)
    n = model.config.tokens_per_segment
    replaced = hmt_token_nll(model, pieces, carry_memory=False)
    carried = hmt_token_nll(model, pieces)
    assert not np.allclose(replaced[:, n + 1 :], carried[:, n + 1 :])
    for s in range(1, 60 // n):
        # [initial memory; segment s; initial memory], as a fresh document's first segment
        # (its first token is predicted by the previous segment's last one, so it is left out).
        alone = hmt_token_nll(model, [p[s * n : (s + 1) * n] for p in pieces])
        np.testing.assert_allclose(replaced[:, s * n + 1 : (s + 1) * n], alone[:, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="carried-memory mode"):
        hmt_token_nll(_model("hmt", segment_length=24, num_sensory=4), pieces, carry_memory=False)
