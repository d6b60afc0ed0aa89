"""The HMT memory embeddings start as the docs say (``HMTConfig.memory_init``)."""

import pytest
import torch

from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.hmt_config import HMTConfig, HMTConfigError
from hmt_plugin.training.model_setup import initial_state_dict


def _pretrained_like(model):
    # Embeddings with a non-zero mean, as trained ones have, so "the mean" is not ~0 by chance.
    with torch.no_grad():
        w = model.backbone.tok_embeddings.weight
        w.normal_(0.3, 0.05, generator=torch.Generator().manual_seed(1))
    return {k[len("backbone."):]: v.clone() for k, v in model.state_dict().items()
            if k.startswith("backbone.")}


def test_mean_embedding_is_the_default_and_fills_every_memory_row():
    model = hmt_tiny(mode="hmt", segment_length=32, num_sensory=4, num_memory_tokens=2)
    assert model.config.memory_init == "mean_embedding"
    base = _pretrained_like(model)
    mean = base["tok_embeddings.weight"].mean(dim=0)
    model.reset_hmt_parameters()
    for name in ("initial_memory", "summary_token"):
        value = getattr(model, name).detach()
        assert value.shape == (2, 64)
        torch.testing.assert_close(value, mean.expand(2, -1), rtol=0, atol=1e-6)
    # The recipes' path (initial_state_dict, used on meta-device models too) gives the same.
    full = initial_state_dict(model, base, lora=None, seed=0)
    torch.testing.assert_close(full["initial_memory"], mean.expand(2, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(full["summary_token"], mean.expand(2, -1), rtol=0, atol=1e-6)


def test_published_init_draws_from_the_embedding_spread_seeded():
    model = hmt_tiny(mode="hmt", segment_length=256, num_sensory=4, memory_init="published",
                     num_memory_tokens=64)
    base = _pretrained_like(model)
    a = initial_state_dict(model, base, lora=None, seed=3)
    b = initial_state_dict(model, base, lora=None, seed=3)
    c = initial_state_dict(model, base, lora=None, seed=4)
    torch.testing.assert_close(a["initial_memory"], b["initial_memory"], rtol=0, atol=0)
    assert not torch.equal(a["initial_memory"], c["initial_memory"])
    drawn = a["initial_memory"]
    # N(0, std of the embeddings): centred on 0, not on the embeddings' mean of 0.3.
    assert abs(drawn.mean().item()) < 0.02
    assert drawn.std().item() == pytest.approx(base["tok_embeddings.weight"].std().item(), rel=0.1)


def test_unknown_memory_init_is_refused_by_name():
    with pytest.raises(HMTConfigError, match="memory_init='bos'.*mean_embedding, published"):
        HMTConfig(memory_init="bos")
