"""HMT against a naive re-statement of the published algorithm: one segment at a time, no
batching of summaries, no host-side planning, Python lists for the cache. Settings the
reference case does not cover: caches smaller than the number of segments, partial last
segments, odd segment sizes (rounding of the summary length), several memory tokens,
batches of 3, no sensory tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers


def naive_hmt(model, ids):
    """The published forward, written plainly. Returns logits, memories, summaries."""
    cfg, dec = model.config, model.backbone
    block, k, m = cfg.tokens_per_segment, cfg.sensory_tokens_used, cfg.num_memory_tokens
    h = int(round(block * cfg.sum_fraction))
    cache, logits, memories, summaries = [], [], [], []
    memory, prev = None, None
    for start in range(0, ids.shape[1], block):
        x = ids[:, start : start + block]
        if cfg.mode == "hmt":
            probe = model.summary_token.expand(ids.shape[0], m, -1)
            seq = torch.cat([probe, embed_tokens(dec, x[:, :h]), probe], 1)
            s = dec.norm(run_layers(dec, seq)[:, -m:])
            summaries.append(s)
            if cache:
                values = torch.cat(cache, 1)[:, -cfg.cache_size :]
                q = model.recall.q_proj(s)
                kk = model.recall.k_proj(values)
                w = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
                memory = w @ values
        if memory is None and cfg.mode != "baseline":
            memory = model.initial_memory.expand(ids.shape[0], m, -1)
        parts = [x] if prev is None or k == 0 else [prev[:, -k:], x]
        emb = embed_tokens(dec, torch.cat(parts, 1))
        n_prefix = emb.shape[1] - x.shape[1]
        sink = 0
        if cfg.mode != "baseline":
            emb = torch.cat([memory, emb, memory], 1)
            if cfg.memory_sink:  # [sink; P_n; sensory; x_n; P_n]
                emb = torch.cat([model.sink.expand(ids.shape[0], 1, -1), emb], 1)
                sink = 1
        hidden = run_layers(dec, emb)
        off = sink + (m if cfg.mode != "baseline" else 0) + n_prefix
        logits.append(project(dec, hidden[:, off : off + x.shape[1]]))
        if cfg.mode != "baseline":
            new = dec.norm(hidden[:, -m:])
            if cfg.memory_scale == "embedding":  # the same direction, length memory_norm
                new = new / new.norm(dim=-1, keepdim=True) * model.memory_norm
            memories.append(new)
            cache.append(new)
            if cfg.mode != "hmt":
                memory = new
            else:
                memory = None
        prev = x
    return torch.cat(logits, 1), memories, summaries


CASES = [
    dict(segment_length=29, num_sensory=4, cache_size=2, length=121, batch=3),  # block 23: h = round(11.5) = 12
    dict(segment_length=27, num_sensory=3, cache_size=1, length=70, batch=2),   # block 22, partial 4
    dict(segment_length=30, num_sensory=0, cache_size=4, length=100, batch=1),  # no sensory
    dict(segment_length=32, num_sensory=4, cache_size=3, length=90, batch=2, num_memory_tokens=2, sum_fraction=0.3),
    dict(segment_length=24, num_sensory=4, cache_size=5, length=55, batch=2, mode="hmt_stage1"),
    dict(segment_length=24, num_sensory=4, cache_size=5, length=55, batch=2, mode="rmt"),
    dict(segment_length=24, num_sensory=4, cache_size=5, length=55, batch=2, mode="baseline"),
    # The two options outside the published function.
    dict(segment_length=29, num_sensory=4, cache_size=2, length=121, batch=3, memory_sink=True),
    dict(segment_length=25, num_sensory=4, cache_size=5, length=55, batch=2, mode="hmt_stage1", memory_sink=True),
    dict(segment_length=24, num_sensory=0, cache_size=5, length=60, batch=2, mode="rmt", memory_sink=True,
         memory_scale="embedding"),
    dict(segment_length=32, num_sensory=4, cache_size=3, length=90, batch=2, num_memory_tokens=2,
         memory_scale="embedding"),
    dict(segment_length=24, num_sensory=4, cache_size=5, length=55, batch=2, mode="baseline", memory_sink=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_naive_published_algorithm(case):
    case = dict(case)
    length, batch = case.pop("length"), case.pop("batch")
    model = hmt_tiny(recall_hidden_dim=24, bptt_depth=50, **case).eval()
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, logits="all")
        logits, memories, summaries = naive_hmt(model, ids)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    if memories:
        torch.testing.assert_close(out.memories, torch.stack(memories, 1), atol=1e-5, rtol=0)
    if summaries:
        torch.testing.assert_close(out.summaries, torch.stack(summaries, 1), atol=1e-5, rtol=0)
