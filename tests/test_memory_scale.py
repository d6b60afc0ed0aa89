"""``memory_scale="embedding"``: the memory a segment writes has a learned length that starts at
a token embedding's, and nothing else about the model changes."""

import pytest
import torch

from hmt_plugin.checkpointing.hmt_files import HMTCheckpointError, load_hmt_into, save_hmt_checkpoint
from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.hmt_config import HMTConfig, HMTConfigError


def _model(mode="hmt", **kw):
    torch.manual_seed(0)
    model = hmt_tiny(mode=mode, segment_length=24, num_sensory=4, cache_size=8, bptt_depth=8, **kw)
    with torch.no_grad():
        # Token embeddings shorter than the final norm's output, as in pretrained models.
        model.backbone.tok_embeddings.weight.mul_(0.25)
    model.reset_hmt_parameters()
    return model


def _tokens(n=3 * 18 + 5):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["rmt", "hmt_stage1", "hmt"])
def test_written_memory_has_the_learned_length(mode):
    model = _model(mode, memory_scale="embedding")
    embedding_norms = model.backbone.tok_embeddings.weight.detach().norm(dim=-1)
    assert model.memory_norm.item() == pytest.approx(embedding_norms.median().item(), rel=1e-6)
    out = model(_tokens(), logits="none")
    lengths = out.memories.norm(dim=-1)
    torch.testing.assert_close(lengths, torch.full_like(lengths, model.memory_norm.item()))
    # The published write keeps the final-norm length, which is not the embedding's here.
    published = _model(mode)
    published.load_state_dict(model.state_dict(), strict=False)
    p_lengths = published(_tokens(), logits="none").memories.norm(dim=-1)
    assert not torch.allclose(p_lengths, lengths, rtol=0.1)


def test_the_length_is_trained_and_the_first_segment_is_unchanged():
    model = _model("hmt", memory_scale="embedding")
    published = _model("hmt")
    published.load_state_dict({k: v for k, v in model.state_dict().items() if k != "memory_norm"})
    tokens = _tokens()
    out = model(tokens, labels=tokens)
    out.nll.mean().backward()
    assert model.memory_norm.grad is not None and model.memory_norm.grad.abs().item() > 0
    assert "memory_norm" in model.hmt_parameter_names()
    # Segment 1 reads initial_memory in both: its logits are the same; segment 2 differs.
    with torch.no_grad():
        a, b = model(tokens).logits, published(tokens).logits
    w = model.config.tokens_per_segment
    torch.testing.assert_close(a[:, :w], b[:, :w], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, w : 2 * w], b[:, w : 2 * w], atol=1e-3)


def test_checkpoint_round_trip_and_mismatch_named(tmp_path):
    model = _model("hmt", memory_scale="embedding")
    with torch.no_grad():
        model.memory_norm.fill_(1.25)
    save_hmt_checkpoint(tmp_path, model.hmt_state_dict(), model.config)
    again = _model("hmt", memory_scale="embedding")
    load_hmt_into(again, tmp_path)
    assert again.memory_norm.item() == 1.25
    with pytest.raises(HMTCheckpointError, match="memory_scale='embedding'.*set the model's memory_scale"):
        load_hmt_into(_model("hmt"), tmp_path)
    save_hmt_checkpoint(tmp_path / "p", _model("hmt").hmt_state_dict(), _model("hmt").config)
    with pytest.raises(HMTCheckpointError, match="memory_scale='published'"):
        load_hmt_into(again, tmp_path / "p")


def test_unknown_memory_scale_is_refused_by_name():
    with pytest.raises(HMTConfigError, match="memory_scale='unit'.*published, embedding"):
        HMTConfig(memory_scale="unit")
    with pytest.raises(HMTConfigError, match="memory_sink='yes' must be true or false"):
        HMTConfig(memory_sink="yes")


def test_sink_takes_a_position_not_a_new_token_and_is_a_learned_mean_embedding(tmp_path):
    a = HMTConfig(segment_length=24, num_sensory=4)
    b = HMTConfig(segment_length=25, num_sensory=4, memory_sink=True)
    assert a.tokens_per_segment == b.tokens_per_segment == 18
    assert b.with_mode("baseline", keep_tokens_per_segment=True).segment_length == 18
    model = _model("hmt", memory_sink=True)
    mean = model.backbone.tok_embeddings.weight.detach().mean(dim=0)
    torch.testing.assert_close(model.sink.detach()[0], mean, rtol=0, atol=1e-6)
    tokens = _tokens()
    model(tokens, labels=tokens).nll.mean().backward()
    assert model.sink.grad.abs().sum() > 0
    save_hmt_checkpoint(tmp_path, model.hmt_state_dict(), model.config)
    with pytest.raises(HMTCheckpointError, match="memory_sink=True.*memory_sink=False"):
        load_hmt_into(_model("hmt"), tmp_path)
