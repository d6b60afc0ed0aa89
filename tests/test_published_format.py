"""Loading HMT parameters written by the published code, and its hyperparameter names."""

import pytest
import torch

from hmt_plugin.checkpointing import hmt_config_from_published, load_published_hmt
from hmt_plugin.models import hmt_tiny

SETTINGS = dict(segment_length=32, num_sensory=4, recall_hidden_dim=48, cache_size=3)


def published_state(dim=64, hidden=48, recall=True, prefix=""):
    g = torch.Generator().manual_seed(0)
    sd = {
        "memory_cell.memory": torch.randn(1, dim, generator=g),
        "memory_cell.mem_map.linear.weight": torch.randn(dim, dim, generator=g),
        "memory_cell.mem_map.inv_linear.weight": torch.randn(dim, dim, generator=g),
        "memory_cell.model.model.embed_tokens.weight": torch.randn(256, dim, generator=g),
    }
    if recall:
        sd.update({
            "mem": torch.randn(1, dim, generator=g),
            "cross_attn.wq.weight": torch.randn(hidden, dim, generator=g).bfloat16(),
            "cross_attn.wk.weight": torch.randn(hidden, dim, generator=g).bfloat16(),
        })
    return {prefix + k: v for k, v in sd.items()}


def test_loads_and_maps_names_with_module_prefix_and_bf16():
    model = hmt_tiny(**SETTINGS)
    sd = published_state(prefix="module.")
    backbone = load_published_hmt(model, sd)
    assert torch.equal(model.initial_memory, sd["module.memory_cell.memory"])
    assert torch.equal(model.summary_token, sd["module.mem"])
    assert torch.equal(model.recall.q_proj.weight, sd["module.cross_attn.wq.weight"].float())
    assert list(backbone) == ["model.embed_tokens.weight"]


def test_stage1_checkpoint_loads_into_hmt_keeping_fresh_recall():
    model = hmt_tiny(**SETTINGS)
    fresh = model.recall.q_proj.weight.detach().clone()
    load_published_hmt(model, published_state(recall=False))
    assert torch.equal(model.recall.q_proj.weight, fresh)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("memory_cell.memory"), "no 'memory_cell.memory'"),
        (lambda sd: sd.__setitem__("cross_attn.wq.weight", torch.zeros(32, 64)), "'cross_attn.wq.weight' has shape \\(32, 64\\).*recall_hidden_dim"),
        (lambda sd: sd.__setitem__("cross_attn.bias", torch.zeros(3)), "unexpected key 'cross_attn.bias'"),
        (lambda sd: sd.pop("cross_attn.wk.weight"), "no 'cross_attn.wk.weight'"),
    ],
)
def test_keys_or_shapes_that_do_not_fit_are_named(edit, match):
    sd = published_state()
    edit(sd)
    with pytest.raises((KeyError, ValueError), match=match):
        load_published_hmt(hmt_tiny(**SETTINGS), sd)


def test_published_hyperparameter_names_in_one_place():
    cfg = hmt_config_from_published({
        "segment_length": 32, "num_sensory": 4, "mem_recall_hidden_dim": 48,
        "mem_recall_context": 3, "memory_size": 1, "sum_fraction": 0.5, "bptt_depth": 6,
        "num_seg_save": 6, "batch": 2,
    })
    assert (cfg.segment_length, cfg.num_sensory, cfg.recall_hidden_dim, cfg.cache_size) == (32, 4, 48, 3)
    assert (cfg.mode, cfg.bptt_depth, cfg.score_scale, cfg.tokens_per_segment) == ("hmt", 6, "published", 26)
    assert hmt_config_from_published({"segment_length": 32, "hmt_stage_1": True}).mode == "hmt_stage1"
    assert hmt_config_from_published({"segment_length": 32}).memory_init == "published"
    assert hmt_config_from_published({"segment_length": 32, "rmt_only": True}).mode == "rmt"
