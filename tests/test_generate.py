"""HMTGenerator on tiny random models: cached decoding against a from-scratch reference,
segment boundaries, long prompts, sampling, stops, errors."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hmt_plugin.generation import HMTGenerator, sample_next_token
from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers

# tokens_per_segment: hmt 18 (summary_tokens 9), hmt_stage1 18, rmt 22, baseline 24.
SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, max_seq_len=64)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on 2 shared cores run far faster without OpenMP threads fighting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(mode="hmt", seed=0, **kw):
    torch.manual_seed(seed)
    model = hmt_tiny(**{**SMALL, **kw})
    with torch.no_grad():
        # At initialisation the recall is nearly uniform over the cache; sharpen it so that
        # which summary queries it (provisional or exact) shows in the logits.
        model.recall.q_proj.weight.mul_(6.0)
        model.recall.k_proj.weight.mul_(6.0)
    model.set_mode(mode)
    return model.eval()


def ids(n, seed=1, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --------------------------------------------------------------------- the reference
def _summary(model, tokens):
    m = model.config.num_memory_tokens
    probe = model.summary_token[None]
    x = torch.cat([probe, embed_tokens(model.backbone, torch.tensor([tokens])), probe], dim=1)
    return model.backbone.norm(run_layers(model.backbone, x)[:, -m:])


@torch.no_grad()
def reference_next_logits(model, seq):
    """Logits of the token after ``seq``, recomputing everything from scratch: complete
    segments through ``model(...)`` (training), the current segment as one uncached pass
    ``[P_n; sensory; x_n]`` with the generator's policy for P_n (provisional summary of the
    previous segment's last summary_tokens tokens until the segment holds summary_tokens)."""
    cfg = model.config
    block, h = cfg.tokens_per_segment, cfg.summary_tokens
    start = ((len(seq) - 1) // block) * block
    x = seq[start:]
    state = model(torch.tensor([seq[:start]]), logits="none").state if start else None
    k = cfg.sensory_tokens_used if start else 0
    if not cfg.uses_memory:
        prefix = None
    elif start == 0:
        prefix = model.initial_memory[None]
    elif not cfg.uses_recall:
        prefix = state.memory
    else:
        summary = _summary(model, x[:h] if len(x) >= h else seq[start - h : start])
        prefix, _ = model.recall(summary, state.cache, state.cache_keys, state.cache_valid)
    embeds = embed_tokens(model.backbone, torch.tensor([seq[start - k :]]))
    if prefix is not None:
        embeds = torch.cat([prefix, embeds], dim=1)
        if cfg.memory_sink:
            embeds = torch.cat([model.sink[None], embeds], dim=1)
    hidden = run_layers(model.backbone, embeds)
    return project(model.backbone, hidden[:, -1:])[0, -1]


def reference_greedy(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(reference_next_logits(model, seq).argmax()))
    return seq[len(prompt) :]


# --------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    "mode,prompt_len",
    [
        ("hmt", 5),  # first segment, nothing to recall
        ("hmt", 2 * 18 + 3),  # tail shorter than summary_tokens: provisional, then refresh
        ("hmt", 2 * 18 + 11),  # tail holds summary_tokens: exact from the start
        ("hmt", 3 * 18),  # prompt of whole segments only
        ("hmt_stage1", 18 + 3),
        ("rmt", 22 + 7),
        ("baseline", 24 + 5),
    ],
)
def test_cached_greedy_equals_recomputing_the_segment(mode, prompt_len):
    _assert_cached_decoding_matches_the_reference(tiny(mode), ids(prompt_len))


@pytest.mark.parametrize("mode,prompt_len", [("hmt", 2 * 17 + 3), ("hmt", 2 * 17 + 11), ("rmt", 21 + 7)])
def test_cached_greedy_with_a_memory_sink(mode, prompt_len):
    """``memory_sink``: the cached segment starts ``[sink; P_n; ...]`` as training reads it."""
    model = tiny(mode, memory_sink=True, memory_scale="embedding")
    _assert_cached_decoding_matches_the_reference(model, ids(prompt_len))


def _assert_cached_decoding_matches_the_reference(model, prompt):
    steps = 2 * model.config.tokens_per_segment + 4  # crosses two boundaries
    gen = HMTGenerator(model)
    # Step by step: the cached logits match the from-scratch pass at every position.
    seq = list(prompt)
    logits = gen.prefill(prompt)[0]
    for _ in range(12):
        torch.testing.assert_close(logits, reference_next_logits(model, seq), atol=2e-5, rtol=1e-5)
        token = int(logits.argmax())
        seq.append(token)
        logits = gen.append([token])[0]
    # And greedy generation gives the same tokens.
    assert gen.generate(prompt, steps).sequences()[0] == reference_greedy(model, prompt, steps)


@pytest.mark.parametrize("mode,options", [("hmt", {}), ("rmt", {}), ("hmt", {"memory_sink": True})])
def test_state_after_generation_is_what_training_computes(mode, options):
    """With the recall refreshed, every memory written while generating is the memory the
    training pass computes on the same tokens."""
    model = tiny(mode, **options)
    prompt = ids(7)
    gen = HMTGenerator(model)
    block = model.config.tokens_per_segment
    out = gen.generate(prompt, 3 * block + 2)
    everything = torch.tensor([prompt + out.tokens[0].tolist()])
    with torch.no_grad():
        ref = model(everything, logits="none").state
    st = gen.state
    assert st.segments_seen == ref.segments_seen == [3]
    torch.testing.assert_close(st.memory, ref.memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.last_hidden, ref.last_hidden, atol=1e-5, rtol=1e-5)
    assert torch.equal(st.pending, ref.pending)
    if mode == "hmt":
        torch.testing.assert_close(st.cache, ref.cache, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.cache_keys, ref.cache_keys, atol=1e-5, rtol=1e-5)
        assert torch.equal(st.sensory, ref.sensory)


def test_generation_crosses_segment_boundaries_and_the_memory_cache_grows():
    model = tiny("hmt", cache_size=8)
    block = model.config.tokens_per_segment
    gen = HMTGenerator(model)
    sizes = []

    def watch(token):
        cache = gen._state.cache
        sizes.append(0 if cache is None else cache.shape[1])

    out = gen.generate(ids(4), 2 * block + 5, callback=watch)
    assert out.tokens.shape == (1, 2 * block + 5) and out.lengths == [2 * block + 5]
    assert sizes[0] == 0 and sizes[-1] == 2 and sorted(sizes) == sizes
    assert gen.state.segments_seen == [2] and gen.tokens_in_segment == 9


def test_refresh_recall_off_keeps_the_provisional_memory():
    model = tiny("hmt")
    prompt = ids(18 + 2)
    on = HMTGenerator(model, refresh_recall=True)
    off = HMTGenerator(model, refresh_recall=False)
    a, b = on.prefill(prompt), off.prefill(prompt)
    torch.testing.assert_close(a, b)  # both provisional before summary_tokens
    for t in ids(8, seed=5):  # the segment reaches summary_tokens: only `on` refreshes
        a, b = on.append([t]), off.append([t])
    assert not torch.allclose(a, b)
    assert off.generate(None, 30).tokens.shape == (1, 30)


# --------------------------------------------------------------------- long prompts
def test_prompt_of_several_segments_matches_one_model_call():
    model = tiny("hmt")
    block, h = model.config.tokens_per_segment, model.config.summary_tokens
    for n in (4 * block, 4 * block + h + 1):  # whole segments; tail past summary_tokens
        prompt = ids(n, seed=n)
        with torch.no_grad():
            want = model(torch.tensor([prompt]), logits=1).logits[0, -1]
        for chunk in (1, 16):
            got = HMTGenerator(model, prefill_chunk_segments=chunk).prefill(prompt)[0]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_rows_decode_together_like_alone():
    model = tiny("hmt")
    rows = [ids(25, seed=1), ids(25, seed=2)]
    together = HMTGenerator(model, max_batch_size=2).generate(rows, 30)
    for r, row in enumerate(rows):
        alone = HMTGenerator(model).generate(row, 30)
        assert together.tokens[r].tolist() == alone.tokens[0].tolist()


def test_generator_leaves_the_model_as_it_was():
    model = tiny("hmt")
    x = torch.tensor([ids(50)])
    with torch.no_grad():
        before = model(x, logits="all").logits
    HMTGenerator(model).generate(ids(10), 40)
    assert all(layer.attn.kv_cache is None for layer in model.backbone.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits="all").logits, before)


class _HostReads(TorchDispatchMode):
    """Counts ops that make the host wait for a device value (item/int/bool of a tensor,
    boolean-mask indexing, nonzero)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 else [])
        )
        if (
            "_local_scalar_dense" in name
            or "nonzero" in name
            or "masked_select" in name
            or bool_index
        ):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_decoding_steps_read_nothing_back_but_the_sampled_token():
    """The sampled ids come back with ``tolist`` (no op here); nothing else may wait for the
    device, across segment boundaries and recall refreshes included."""
    model = tiny("hmt")
    gen = HMTGenerator(model)
    gen.prefill(ids(30))
    with _HostReads() as reads:
        gen.generate(None, 3 * model.config.tokens_per_segment)
    assert reads.ops == []


# --------------------------------------------------------------------- sampling and stops
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny("hmt")
    gen = HMTGenerator(model)
    prompt = ids(10)

    def sampled(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return gen.generate(prompt, 40, temperature=1.0, generator=g, **kw).tokens

    assert torch.equal(sampled(3, top_k=20), sampled(3, top_k=20))
    assert not torch.equal(sampled(3), sampled(4))
    assert torch.equal(sampled(3, top_k=1), gen.generate(prompt, 40).tokens)


def test_sample_next_token_top_k_stays_in_the_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top = logits.topk(5).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = sample_next_token(logits, temperature=2.0, top_k=5, generator=g)
        assert all(t[r] in top[r] for r in range(4))


def test_stop_tokens_and_callback_stop():
    model = tiny("hmt")
    gen = HMTGenerator(model)
    prompt = ids(10)
    free = gen.generate(prompt, 10).tokens[0].tolist()
    out = gen.generate(prompt, 10, stop_tokens=[free[3]])
    first = free.index(free[3])
    assert out.stopped == [True] and out.lengths == [first]
    assert out.tokens.shape[1] == first + 1 and out.sequences() == [free[:first]]
    seen = []
    out = gen.generate(prompt, 10, callback=lambda t: seen.append(t) or len(seen) == 4)
    assert seen == free[:4] and out.tokens.shape[1] == 4 and out.stopped == [True]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda g: g.generate([], 5), "prompt is empty"),
        (lambda g: g.generate([1, 999], 5), "outside the model's vocabulary"),
        (lambda g: g.generate([[1, 2], [3, 4]], 5), "max_batch_size=1"),
        (lambda g: g.generate([1, 2], 5, temperature=-1), "temperature"),
        (lambda g: g.generate([1, 2], 5, top_k=0), "top_k"),
        (lambda g: g.generate(None, 5), "no document yet"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(HMTGenerator(tiny("hmt")))


def test_rows_of_different_lengths_and_mode_changes_are_refused():
    model = tiny("hmt")
    gen = HMTGenerator(model, max_batch_size=2)
    with pytest.raises(ValueError, match="same length"):
        gen.generate([[1, 2, 3], [4, 5]], 3)
    gen.prefill([1, 2, 3])
    model.set_mode("rmt")
    with pytest.raises(RuntimeError, match="settings changed"):
        gen.append([4])
