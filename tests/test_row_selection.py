"""The last decoder layer computes only the positions a backbone call's caller reads
(:class:`~hmt_plugin.modules.backbone.RowSelectingLayer`): the same outputs and gradients as
the whole layer, and the same HMT losses and gradients as without it."""

import pytest
import torch
from torchtune.modules import TransformerSelfAttentionLayer

from hmt_plugin.models import hmt_tiny, lora_hmt_tiny
from hmt_plugin.modules.backbone import RowSelectingLayer, TrailingQueryRoPE, drive_decoder, run_layers
from hmt_plugin.modules.layout import ragged_layout
from hmt_plugin.training.loss import batch_loss

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, bptt_depth=8)


def _mlp_rows(layer, module="mlp"):
    seen = []
    handle = layer.get_submodule(module).register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[1]))
    return seen, handle


def _llama3_2():  # GQA and Llama 3's scaled RoPE
    from torchtune.models.llama3_2 import llama3_2

    return llama3_2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                    max_seq_len=64, intermediate_dim=48)


def _qwen2():  # biases on the query, key and value projections
    from torchtune.models.qwen2 import qwen2

    return qwen2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=1, embed_dim=32,
                 intermediate_dim=48, max_seq_len=64)


@pytest.mark.parametrize("build", [_llama3_2, _qwen2])
@pytest.mark.parametrize("ragged", [False, True])
def test_queries_of_the_kept_rows_alone(build, ragged):
    """The last layer projects queries (and attention outputs) for the kept rows only, at their
    own positions, with the same outputs and input gradients as the whole layer."""
    torch.manual_seed(0)
    decoder = drive_decoder(build()).train()
    last = decoder.layers[-1]
    assert isinstance(last.attn.pos_embeddings, TrailingQueryRoPE)
    s, j = 20, 17
    mask = positions = None
    if ragged:
        mask, positions = ragged_layout([[1, 9, 1], [1, 18, 1]], [1, 18, 1], torch.device("cpu"))
    x = torch.randn(2, s, 32, requires_grad=True)
    seen, handle = _mlp_rows(last, "attn.q_proj")
    part = run_layers(decoder, x, mask=mask, input_pos=positions, rows_from=j)
    handle.remove()
    assert seen == [s - j]
    (grad_part,) = torch.autograd.grad(part.square().sum(), x)
    whole = run_layers(decoder, x, mask=mask, input_pos=positions)
    (grad_whole,) = torch.autograd.grad(whole[:, j:].square().sum(), x)
    torch.testing.assert_close(part, whole[:, j:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_part, grad_whole, rtol=1e-5, atol=1e-6)


def test_without_the_trailing_query_rope_every_row_is_computed():
    """A last layer whose RoPE cannot place a shorter query (replaced after the decoder was
    prepared) computes every row's query and slices: the same outputs, never misplaced ones."""
    torch.manual_seed(0)
    decoder = drive_decoder(_llama3_2()).eval()
    last = decoder.layers[-1]
    x = torch.randn(2, 20, 32)
    expected = run_layers(decoder, x, rows_from=10)
    last.attn.pos_embeddings = last.attn.pos_embeddings.rope
    seen, handle = _mlp_rows(last, "attn.q_proj")
    got = run_layers(decoder, x, rows_from=10)
    handle.remove()
    assert seen == [20]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_kept_rows_equal_the_whole_layer(ragged, checkpointed):
    torch.manual_seed(0)
    decoder = hmt_tiny(**SMALL).backbone.train()
    assert type(decoder.layers[-1]) is RowSelectingLayer
    if checkpointed:  # torchtune's per-layer activation checkpointing wraps every layer
        from torchtune import training

        training.set_activation_checkpointing(decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    s, j = 20, 13
    mask = positions = None
    if ragged:
        mask, positions = ragged_layout([[1, 9, 1], [1, 18, 1]], [1, 18, 1], torch.device("cpu"))
    x = torch.randn(2, s, decoder.tok_embeddings.embedding_dim, requires_grad=True)
    seen, handle = _mlp_rows(decoder.layers[-1] if not checkpointed else decoder.layers[-1]._checkpoint_wrapped_module)
    part = run_layers(decoder, x, mask=mask, input_pos=positions, rows_from=j)
    (grad_part,) = torch.autograd.grad(part.square().sum(), x)
    assert seen[0] == s - j  # the feed-forward ran on the kept rows only
    whole = run_layers(decoder, x, mask=mask, input_pos=positions)
    handle.remove()
    (grad_whole,) = torch.autograd.grad(whole[:, j:].square().sum(), x)
    assert part.shape == (2, s - j, x.shape[-1])
    torch.testing.assert_close(part, whole[:, j:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_part, grad_whole, rtol=1e-5, atol=1e-6)


def _step(model, batch, **options):
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, torch.device("cpu"), "last", **options)
    (loss.loss_sum / loss.num_tokens).backward()
    return loss.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["hmt", "hmt_stage1", "rmt"])
@pytest.mark.parametrize("options", [dict(log_all_segments=False), dict(log_all_segments=True),
                                     dict(log_all_segments=False, checkpoint_segments=True)])
def test_hmt_loss_and_gradients_do_not_change(mode, options):
    """A whole training step with the row-selecting last layer against the same model with a
    plain last layer (which the backbone call then runs in full)."""
    torch.manual_seed(0)
    model = lora_hmt_tiny(["q_proj", "v_proj"], mode=mode, **SMALL).train()
    for m in model.modules():  # deterministic: no LoRA dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 100), generator=g)
    batch = {"tokens": tokens, "labels": tokens.clone(), "seq_lens": torch.tensor([100, 71])}
    batch["labels"][1, 71:] = -100
    last = model.backbone.layers[-1]
    seen, handle = _mlp_rows(last)
    loss, grads = _step(model, batch, **options)
    handle.remove()
    assert min(seen) < max(seen)  # some calls computed fewer rows
    last.__class__ = TransformerSelfAttentionLayer
    ref_loss, ref_grads = _step(model, batch, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
