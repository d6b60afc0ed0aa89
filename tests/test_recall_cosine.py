"""score_scale "cosine": the recall scores unit-length queries and keys, so hidden states of
large norm (final-norm memories of norm ~50) cannot saturate its softmax."""

import math

import pytest
import torch
import torch.nn.functional as F

from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.recall import MemoryRecall


def test_cosine_scores_are_sqrt_dh_times_the_cosine():
    torch.manual_seed(0)
    recall = MemoryRecall(64, 16, "cosine")
    summary, cache = torch.randn(2, 1, 64), torch.randn(2, 5, 64)
    got, weights = recall(summary, cache, recall.keys(cache))
    q = F.linear(summary, recall.q_proj.weight)
    k = F.linear(cache, recall.k_proj.weight)
    cos = F.cosine_similarity(q[:, :, None], k[:, None], dim=-1)  # [b, 1, c]
    expected = F.softmax(math.sqrt(16) * cos, dim=-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(got, expected @ cache)


def test_cosine_recall_ignores_the_size_of_the_vectors():
    # The failure it is for: memories of norm ~50 make dot-product scores a hard argmax.
    torch.manual_seed(0)
    cosine, dot = MemoryRecall(64, 16, "cosine"), MemoryRecall(64, 16, "sqrt")
    dot.load_state_dict(cosine.state_dict())
    summary, cache = torch.randn(1, 1, 64), torch.randn(1, 6, 64)
    small = cosine(summary, cache, cosine.keys(cache))[1]
    large = cosine(50 * summary, 50 * cache, cosine.keys(50 * cache))[1]
    torch.testing.assert_close(small, large)
    assert small.max() < 0.9  # the weights stay spread ...
    assert dot(50 * summary, 50 * cache, dot.keys(50 * cache))[1].max() > 0.999  # ... dot saturates


def test_cosine_recall_trains_in_the_model_and_round_trips_its_config():
    model = hmt_tiny(segment_length=24, num_sensory=4, recall_hidden_dim=16, score_scale="cosine",
                     bptt_depth=4)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    third = out.recall_scores[0, 2, 0]  # the third segment chooses between two memories
    torch.testing.assert_close(third.sum(), torch.tensor(1.0))
    assert (third > 0).sum() == 2
    out.nll.sum().backward()
    assert model.recall.q_proj.weight.grad.abs().sum() > 0
    assert model.recall.k_proj.weight.grad.abs().sum() > 0
    assert type(model.config).from_dict(model.config.to_dict()).score_scale == "cosine"


def test_unknown_score_scale_names_the_choices():
    with pytest.raises(ValueError, match="'cosine'"):
        MemoryRecall(8, 8, "cos")
