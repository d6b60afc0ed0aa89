"""The HMT wrapper on tiny models: what it computes, where gradients go, streaming."""

import pytest
import torch
import torch.nn.functional as F
from torchtune.models.gemma import gemma
from torchtune.models.gemma2 import gemma2
from torchtune.models.llama3_1 import llama3_1
from torchtune.models.llama3_2 import lora_llama3_2
from torchtune.models.qwen2 import lora_qwen2
from torchtune.models.llama2 import llama2
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.mistral import mistral
from torchtune.models.phi3 import phi3
from torchtune.models.qwen2 import qwen2
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from hmt_plugin.models import hmt, hmt_tiny, lora_hmt_tiny
from hmt_plugin.modules import HMTConfig
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, bptt_depth=8)


def tiny(**kw):
    settings = {**SMALL, **kw}
    model = hmt_tiny(**settings)
    model.eval()
    return model


def tokens(batch=2, length=100, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


# --------------------------------------------------------------------- backbones
BACKBONES = {
    "llama2": lambda: llama2(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, max_seq_len=128, intermediate_dim=96),
    "llama3_2_tied": lambda: llama3_2(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96),
    "qwen2_tied": lambda: qwen2(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96, tie_word_embeddings=True),
    "mistral": lambda: mistral(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96),
    "gemma": lambda: gemma(vocab_size=256, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=1, embed_dim=64, max_seq_len=128, intermediate_dim=96),
    "phi3": lambda: phi3(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64, max_seq_len=128, intermediate_dim=96),
    "llama3_1_scaled_rope": lambda: llama3_1(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96),
    "gemma2": lambda: gemma2(vocab_size=256, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96, sliding_window_size=16),
    "lora_llama3_2_tied": lambda: lora_llama3_2(["q_proj", "v_proj"], apply_lora_to_mlp=True, vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96, lora_rank=4, lora_alpha=8),
    "lora_qwen2_tied": lambda: lora_qwen2(["q_proj", "k_proj"], vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=128, intermediate_dim=96, tie_word_embeddings=True, lora_rank=4, lora_alpha=8),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_wraps_torchtune_decoders(name):
    decoder = BACKBONES[name]()
    ids = tokens(length=60)
    with torch.no_grad():
        reference = decoder(ids[:, :24])  # before wrapping: the stock forward
        model = hmt(decoder, **SMALL).eval()
        keys = {k[len("backbone."):] for k in model.state_dict() if k.startswith("backbone.")}
        assert keys == set(decoder.state_dict())
        out = model(ids, labels=ids)
        model.set_mode("baseline")
        base = model(ids[:, :24], logits="all")
    assert out.logits.shape == (2, 60, 256)
    assert torch.isfinite(out.nll).all() and out.memories.shape[1] == 4
    torch.testing.assert_close(base.logits, reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- semantics
def test_baseline_equals_backbone_per_segment():
    model = tiny(mode="baseline")
    ids = tokens(length=50)
    block = model.config.tokens_per_segment
    assert block == 24
    with torch.no_grad():
        out = model(ids)
        pieces = [embed_tokens(model.backbone, ids[:, s : s + block]) for s in range(0, 50, block)]
        expected = torch.cat(
            [project(model.backbone, run_layers(model.backbone, p)) for p in pieces], dim=1
        )
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=0)
    assert out.memories is None and out.recall_scores is None


def test_batched_encoding_equals_per_segment_encoding():
    model = tiny()
    ids = tokens(length=100)  # 18 new tokens per segment: 5 full segments and one of 10
    cfg = model.config
    h, m = cfg.summary_tokens, cfg.num_memory_tokens
    with torch.no_grad():
        out = model(ids, logits="none")
        for n in range(out.summaries.shape[1]):
            seg = ids[:, n * cfg.tokens_per_segment :][:, :h]
            probe = model.summary_token.expand(2, m, -1)
            x = torch.cat([probe, embed_tokens(model.backbone, seg), probe], dim=1)
            alone = model.backbone.norm(run_layers(model.backbone, x)[:, -m:])
            torch.testing.assert_close(out.summaries[:, n], alone, atol=1e-5, rtol=0)


def test_recall_reads_the_cache_and_memory_follows_the_reference_layout():
    """Segment 1 recalls from a one-entry cache: P_1 = M_0 exactly; the recall pass is
    [P; sensory; x; P] with plain positions."""
    model = tiny()
    cfg = model.config
    ids = tokens(batch=1, length=2 * cfg.tokens_per_segment)
    with torch.no_grad():
        out = model(ids, logits="all")
        m0 = out.memories[:, 0]
        block, k = cfg.tokens_per_segment, cfg.num_sensory
        emb = embed_tokens(model.backbone, torch.cat([ids[:, block - k : block], ids[:, block:]], 1))
        hidden = run_layers(model.backbone, torch.cat([m0, emb, m0], dim=1))
        logits = project(model.backbone, hidden[:, 1 + k : 1 + k + block])
    torch.testing.assert_close(out.logits[:, block:], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memories[:, 1], model.backbone.norm(hidden[:, -1:]), atol=1e-5, rtol=0)
    assert out.recall_scores[0, 1, 0, -1] == pytest.approx(1.0)


def test_nll_is_next_token_cross_entropy_across_segments():
    model = tiny()
    ids = tokens(length=70)
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(out.nll[:, 1:], expected.view(2, -1), atol=1e-5, rtol=0)
    assert (out.nll[:, 0] == 0).all()


@pytest.mark.parametrize("mode", ["rmt", "hmt_stage1", "hmt"])
def test_modes_use_their_own_layout(mode):
    model = tiny(mode=mode)
    expected_block = {"rmt": 22, "hmt_stage1": 18, "hmt": 18}[mode]
    assert model.config.tokens_per_segment == expected_block
    with torch.no_grad():
        out = model(tokens(length=60), labels=tokens(length=60))
    assert out.memories.shape == (2, -(-60 // expected_block), 1, 64)
    assert (out.summaries is not None) == (mode == "hmt")


def test_stage1_state_loads_into_hmt_and_hmt_runs_without_recall():
    stage1 = tiny(mode="hmt_stage1")
    full = tiny(mode="hmt")
    missing, unexpected = full.load_state_dict(stage1.state_dict(), strict=False)
    assert sorted(missing) == ["recall.k_proj.weight", "recall.q_proj.weight", "summary_token"]
    assert unexpected == []
    ids = tokens(length=60)
    with torch.no_grad():
        a = stage1(ids)
        full.set_mode("hmt_stage1")
        b = full(ids)
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(ValueError, match="recall parameters"):
        stage1.set_mode("hmt")


@pytest.mark.parametrize("mode", ["hmt", "hmt_stage1"])
def test_set_num_sensory_reads_as_a_model_built_with_it(mode):
    """k = 0 on a loaded model: the same new tokens per segment in a shorter call, and the
    same function as the same weights in a model configured with k = 0 from the start."""
    model = tiny(mode=mode)
    block = model.config.tokens_per_segment
    ids = tokens(length=60)
    with torch.no_grad():
        as_built = model(ids).logits
    model.set_num_sensory(0)
    assert model.config.num_sensory == 0 and model.config.tokens_per_segment == block
    assert model.config.segment_length == SMALL["segment_length"] - SMALL["num_sensory"]
    built = tiny(mode=mode, num_sensory=0, segment_length=SMALL["segment_length"] - SMALL["num_sensory"])
    built.load_state_dict(model.state_dict())
    with torch.no_grad():
        without = model(ids).logits
        torch.testing.assert_close(without, built(ids).logits)
        assert not torch.allclose(without, as_built)
        model.set_num_sensory(SMALL["num_sensory"])  # and back: the model as it was built
        torch.testing.assert_close(model(ids).logits, as_built)
    with pytest.raises(ValueError, match="num_sensory=1000 must be smaller"):
        model.set_num_sensory(1000)  # the config's own check, naming the field
    assert model.config.num_sensory == SMALL["num_sensory"]


# --------------------------------------------------------------------- gradients
def test_gradients_reach_hmt_and_lora_parameters():
    model = lora_hmt_tiny(["q_proj", "v_proj"], **SMALL)
    set_trainable_params(model, get_adapter_params(model))
    ids = tokens(length=72)
    out = model(ids, labels=ids, logits="none", loss_scope="last")
    out.nll[:, -18:].mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {"initial_memory", "summary_token", "recall.q_proj.weight", "recall.k_proj.weight"} <= set(trainable)
    assert any("lora_a" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None, name
        if "lora_a" not in name:  # LoRA B starts at zero, so A's first gradient is zero
            assert p.grad.abs().sum() > 0, name
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("mode", ["hmt", "rmt"])
def test_truncation_cuts_gradients_at_bptt_depth(mode):
    """Each segment uses its own token ids, so the embedding-table rows that receive gradient
    from the loss of segment 3 tell which segments the gradient reached."""

    def reached(depth):
        model = tiny(mode=mode, bptt_depth=depth)
        model.load_state_dict(reference.state_dict())
        block, k = model.config.tokens_per_segment, model.config.sensory_tokens_used
        ids = torch.cat([n * 60 + torch.arange(block) for n in range(4)])[None]
        out = model(ids, labels=ids, logits="none")
        (grad,) = torch.autograd.grad(out.nll[:, 3 * block :].sum(), [model.backbone.tok_embeddings.weight])
        rows = grad.abs().sum(-1) > 0
        # Tokens of segment n that are not repeated as sensory tokens of segment n+1.
        return [bool(rows[n * 60 : n * 60 + block - k].any()) for n in range(4)]

    reference = tiny(mode=mode, bptt_depth=2)
    # Windows {0,1} and {2,3}: the loss of segment 3 reaches segment 2, not 1 or 0.
    assert reached(2) == [False, False, True, True]
    assert reached(4) == [True, True, True, True]


def test_key_projection_learns_across_truncation_boundaries():
    """Truncation cuts the graph into earlier segments' memories, not the key projection
    applied to them: with bptt_depth 2, segment 2 still recalls over 2 memories with keys
    that depend on k_proj."""
    model = tiny(bptt_depth=2)
    ids = tokens(length=3 * model.config.tokens_per_segment)
    out = model(ids, labels=ids, logits="none")
    out.nll.sum().backward()
    assert model.recall.k_proj.weight.grad.abs().sum() > 0
    assert model.recall.q_proj.weight.grad.abs().sum() > 0


def test_last_scope_builds_no_graph_for_other_segments():
    model = tiny()
    ids = tokens(length=72)
    out = model(ids, labels=ids, logits="none", loss_scope="last")
    block = model.config.tokens_per_segment
    assert out.nll.requires_grad
    (g,) = torch.autograd.grad(out.nll.sum(), [model.backbone.output.weight])
    model.zero_grad()
    scoped = model(ids, labels=ids, logits="none", loss_scope="all")
    (g_last,) = torch.autograd.grad(scoped.nll[:, -block:].sum(), [model.backbone.output.weight])
    torch.testing.assert_close(g, g_last, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.nll.detach(), scoped.nll.detach(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------- streaming
@pytest.mark.parametrize("split", [36, 50, 7])
def test_streaming_two_calls_equal_one(split):
    """Boundary (36 = 2 segments), mid-segment (50), and before the summary is complete (7)."""
    model = tiny()
    ids = tokens(length=100)
    with torch.no_grad():
        whole = model(ids, labels=ids)
        first = model(ids[:, :split], labels=ids[:, :split])
        second = model(ids[:, split:], labels=ids[:, split:], state=first.state)
    torch.testing.assert_close(second.logits, whole.logits[:, split:], atol=1e-5, rtol=0)
    torch.testing.assert_close(second.nll, whole.nll[:, split:], atol=1e-5, rtol=0)
    torch.testing.assert_close(second.state.cache, whole.state.cache, atol=1e-5, rtol=0)
    assert second.state.segments_seen == whole.state.segments_seen


def test_streaming_rows_of_different_lengths():
    model = tiny()
    ids = tokens(length=100)
    lens = [100, 61]
    with torch.no_grad():
        whole = [model(ids[b : b + 1, : lens[b]]) for b in range(2)]
        first = model(ids[:, :45], seq_lens=[45, 45])
        rest = ids[:, 45:]
        second = model(rest, seq_lens=[55, 16], state=first.state)
    for b in range(2):
        n = lens[b] - 45
        torch.testing.assert_close(second.logits[b, :n], whole[b].logits[0, 45:], atol=1e-5, rtol=0)


def test_padding_does_not_change_a_row():
    model = tiny()
    ids = tokens(length=100)
    with torch.no_grad():
        alone = model(ids[1:, :41], labels=ids[1:, :41])
        batched = model(ids, seq_lens=[100, 41], labels=ids)
    torch.testing.assert_close(batched.logits[1, :41], alone.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.nll[1, :41], alone.nll[0], atol=1e-5, rtol=0)
    assert (batched.nll[1, 41:] == 0).all()


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(segment_length=6, num_sensory=4), "no room for new tokens"),
        (dict(mode="hmt_v2"), "not an HMT mode"),
        (dict(segment_length=24, num_sensory=18), "num_sensory=18 must be smaller"),
        (dict(recall_hidden_dim=0), "recall_hidden_dim=0"),
        (dict(cache_size=0), "cache_size=0"),
        (dict(bptt_depth=0), "bptt_depth=0"),
        (dict(sum_fraction=1.5), "sum_fraction"),
        (dict(score_scale="cos"), "score_scale"),
    ],
)
def test_bad_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        HMTConfig(**{**SMALL, **settings})


def test_segment_longer_than_backbone_context():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        hmt_tiny(max_seq_len=64, segment_length=128)


def test_backbone_it_cannot_drive():
    with pytest.raises(TypeError, match="TransformerDecoder"):
        hmt(torch.nn.Linear(4, 4), **SMALL)


def test_token_ids_beyond_vocabulary():
    model = tiny()
    ids = tokens(length=30)
    ids[0, 3] = 300
    with pytest.raises(ValueError, match="vocabulary"):
        model(ids)


def test_kv_caches_left_on_the_backbone_do_not_change_results():
    """torchtune's attention drops its default causal mask once a KV cache exists."""
    from torchtune.modules.common_utils import disable_kv_cache

    model = tiny()
    ids = tokens(length=60)
    with torch.no_grad():
        expected = model(ids).logits
        model.backbone.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=64)
        with pytest.raises(RuntimeError, match="KV caches set up and enabled"):
            model(ids)
        with disable_kv_cache(model.backbone):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
