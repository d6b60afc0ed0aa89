"""recall_dtype: the memory search in bfloat16 as the published code runs it, against a plain
re-statement of its CrossAttentionMemory.forward; the default stays the model's dtype."""

import math

import pytest
import torch
import torch.nn.functional as F

from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules import HMTConfig
from hmt_plugin.modules.hmt_config import HMTConfigError
from hmt_plugin.modules.recall import MemoryRecall


def _published_recall(wq, wk, query, memory, hidden_dim):
    """The published forward: everything in bf16, the softmax in fp32 cast back."""
    q = F.linear(query.bfloat16(), wq.bfloat16())
    k = F.linear(memory.bfloat16(), wk.bfloat16())
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(hidden_dim)
    scores = F.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(scores, memory.bfloat16()), scores


def test_bf16_recall_is_the_published_computation():
    torch.manual_seed(0)
    recall = MemoryRecall(64, 48, "sqrt", recall_dtype="bfloat16")
    with torch.no_grad():  # weights as a published checkpoint stores them (bf16 values)
        recall.q_proj.weight.copy_(recall.q_proj.weight.bfloat16().float())
        recall.k_proj.weight.copy_(recall.k_proj.weight.bfloat16().float())
    summary, cache = torch.randn(2, 1, 64), torch.randn(2, 5, 64)
    # Keys enter the cache one memory at a time, as HMT writes them.
    keys = torch.cat([recall.keys(cache[:, i : i + 1]) for i in range(5)], dim=1)
    got, weights = recall(summary, cache, keys)
    expected, scores = _published_recall(recall.q_proj.weight, recall.k_proj.weight, summary, cache, 48)
    assert got.dtype == torch.bfloat16 and weights.dtype == torch.float32
    assert torch.equal(got, expected) and torch.equal(weights, scores.float())
    default = MemoryRecall(64, 48, "sqrt")
    default.load_state_dict(recall.state_dict())
    fp32, _ = default(summary, cache, default.keys(cache))
    assert fp32.dtype == torch.float32 and (fp32 - got.float()).abs().max() > 1e-4


def test_recall_dtype_reaches_the_model_and_keeps_parameters_in_the_model_dtype():
    model = hmt_tiny(segment_length=24, num_sensory=4, recall_hidden_dim=16, recall_dtype="bfloat16")
    assert model.recall.compute_dtype == torch.bfloat16
    assert model.recall.q_proj.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    out.nll.sum().backward()  # trains through the bf16 recall
    assert model.recall.q_proj.weight.grad.abs().sum() > 0
    assert HMTConfig.from_dict(model.config.to_dict()).recall_dtype == "bfloat16"
    assert HMTConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k != "recall_dtype"}).recall_dtype is None


def test_bad_recall_dtype_is_named():
    with pytest.raises(HMTConfigError, match=r"recall_dtype='bf16' is unknown; use null .*'bfloat16'"):
        HMTConfig(recall_dtype="bf16")
