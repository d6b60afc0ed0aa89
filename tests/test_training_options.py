"""The training-speed options keep the loss and the gradients of the default path:
per-segment activation checkpointing, and skipping the NLL of segments that carry no loss."""

import math

import pytest
import torch

from hmt_plugin.models import hmt_tiny, lora_hmt_tiny
from hmt_plugin.training.loss import LossAccumulator, batch_loss

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3, bptt_depth=8)


def _batch(lengths, width, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (len(lengths), width), generator=g)
    labels = tokens.clone()
    for row, n in enumerate(lengths):
        labels[row, n:] = -100
        tokens[row, n:] = 0
    return {"tokens": tokens, "labels": labels, "seq_lens": torch.tensor(lengths)}


def _step(model, batch, scope, **options):
    """Loss, gradients by parameter name, and the logged metrics of one batch."""
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, torch.device("cpu"), scope, **options)
    (loss.loss_sum / loss.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    sums = LossAccumulator()
    sums.add(loss)
    return loss, grads, sums.metrics(elapsed=1.0)


def _same(reference, other, atol=1e-6):
    loss_a, grads_a, _ = reference
    loss_b, grads_b, _ = other
    assert torch.allclose(loss_a.loss_sum, loss_b.loss_sum, rtol=1e-6, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=1e-5, atol=atol), name


# Ragged rows (a partial last segment, rows ending in different segments) and a window that is
# cut by truncated BPTT, in every mode that has segments to remember.
CASES = [
    ("hmt", dict(), [100, 73]),
    ("hmt", dict(bptt_depth=2), [100, 100]),
    ("hmt_stage1", dict(), [100, 41]),
    ("rmt", dict(), [90, 90]),
]


@pytest.mark.parametrize("mode,extra,lengths", CASES)
@pytest.mark.parametrize("scope", ["last", "all"])
def test_segment_checkpointing_keeps_loss_and_gradients(mode, extra, lengths, scope):
    model = hmt_tiny(**{**SMALL, **extra, "mode": mode}).train()
    batch = _batch(lengths, 100)
    reference = _step(model, batch, scope)
    checkpointed = _step(model, batch, scope, checkpoint_segments=True)
    _same(reference, checkpointed)
    assert reference[2] == pytest.approx(checkpointed[2], rel=1e-6)


def test_segment_checkpointing_recomputes_lora_dropout_identically():
    """Recompute in backward redraws dropout from the saved RNG state: the same masks."""
    model = lora_hmt_tiny(["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_dropout=0.3, **SMALL).train()
    batch = _batch([100, 80], 100)
    torch.manual_seed(1)
    reference = _step(model, batch, "last")
    torch.manual_seed(1)
    checkpointed = _step(model, batch, "last", checkpoint_segments=True)
    _same(reference, checkpointed)


def test_segment_checkpointing_saves_activation_memory():
    """Saved activations stop growing with the number of segments: count the bytes autograd
    keeps for backward after the forward."""

    def saved_bytes(checkpoint, width):
        model = hmt_tiny(**SMALL).train()
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch_loss(model, _batch([width, width], width), torch.device("cpu"), "last",
                       checkpoint_segments=checkpoint)
        return sum(kept)

    plain = saved_bytes(False, 200), saved_bytes(False, 400)
    light = saved_bytes(True, 200), saved_bytes(True, 400)
    assert light[0] < plain[0] / 3 and light[1] < plain[1] / 3
    # What is left per segment is a few vectors (inputs and outputs), not the layers' insides.
    assert light[1] - light[0] < (plain[1] - plain[0]) / 3


@pytest.mark.parametrize("lengths", [[100, 100], [100, 73], [100, 20]])
def test_loss_only_nll_keeps_loss_and_gradients(lengths):
    """``log_all_segments=False`` skips the NLL of segments without loss targets: the loss
    and every gradient are unchanged, the last-segment PPL too; the all-segment PPL is not
    logged (it was not computed)."""
    model = hmt_tiny(**SMALL).train()
    batch = _batch(lengths, 100)
    reference = _step(model, batch, "last")
    lean = _step(model, batch, "last", log_all_segments=False)
    _same(reference, lean)
    assert lean[0].all_sum is None
    assert "ppl_all_segments" in reference[2] and "ppl_all_segments" not in lean[2]
    for key in ("loss", "ppl_last_segment", "tokens_per_second_per_rank"):
        assert math.isclose(reference[2][key], lean[2][key], rel_tol=1e-6)
    # Both options at once.
    _same(reference, _step(model, batch, "last", log_all_segments=False, checkpoint_segments=True))


def test_loss_only_nll_with_loss_over_all_segments_changes_nothing():
    model = hmt_tiny(**SMALL).train()
    batch = _batch([100, 73], 100)
    reference = _step(model, batch, "all")
    lean = _step(model, batch, "all", log_all_segments=False)
    _same(reference, lean)
    assert lean[2] == pytest.approx(reference[2], rel=1e-6)


def test_loss_only_nll_is_zero_outside_the_last_segment():
    model = hmt_tiny(**SMALL).eval()
    batch = _batch([100, 50], 100)
    with torch.no_grad():
        full = model(batch["tokens"], seq_lens=[100, 50], labels=batch["labels"],
                     logits="none", loss_scope="last")
        lean = model(batch["tokens"], seq_lens=[100, 50], labels=batch["labels"],
                     logits="none", loss_scope="last", outputs="loss")
    block = model.config.tokens_per_segment
    starts = [((n - 1) // block) * block for n in (100, 50)]
    for row, (n, start) in enumerate(zip([100, 50], starts)):
        # Within fp32 rounding: the two read different rows, so attention runs on
        # differently shaped queries.
        torch.testing.assert_close(lean.nll[row, start:n], full.nll[row, start:n],
                                   rtol=1e-6, atol=1e-6)
    # Segments in which no row has loss targets are skipped for the whole batch.
    first = min(starts)
    assert not lean.nll[:, :first].any() and full.nll[:, 1:first].all()


    # The first segment's summary is not computed (it recalls nothing); the others are.
    assert not lean.summaries[:, 0].any()
    assert torch.allclose(lean.summaries[:, 1:], full.summaries[:, 1:], atol=1e-6)


def test_outputs_option_is_checked():
    model = hmt_tiny(**SMALL)
    with pytest.raises(ValueError, match="outputs='some'"):
        model(torch.zeros(1, 30, dtype=torch.long), outputs="some")


# --------------------------------------------------------------------- the recipes' keys
def test_recipe_options_are_checked():
    from omegaconf import OmegaConf

    from hmt_plugin.training.run_config import ConfigError, loss_options

    default = loss_options(OmegaConf.create({"log_every_n_steps": 5}))
    # ppl_all_segments is computed on the logged steps only.
    assert default.for_step(5) == {"log_all_segments": True, "checkpoint_segments": False}
    assert default.for_step(6)["log_all_segments"] is False
    off = loss_options(OmegaConf.create({"log_all_segments": False}))
    assert off.for_step(1)["log_all_segments"] is False
    with pytest.raises(ConfigError, match="segment_checkpointing='yes' must be true or false"):
        loss_options(OmegaConf.create({"segment_checkpointing": "yes"}))
    with pytest.raises(ConfigError, match="both true"):
        loss_options(OmegaConf.create({"segment_checkpointing": True,
                                       "enable_activation_checkpointing": True}))


@pytest.mark.slow
def test_recipe_with_both_options_logs_the_same_losses(tmp_path):
    """The single-device recipe with ``segment_checkpointing: true`` and
    ``log_all_segments: false``: the same losses and last-segment PPL step by step, and no
    ``ppl_all_segments`` in the log."""
    from hmt_plugin.bench.runs import read_metrics
    from tests.recipe_utils import demo_config, run_in_process

    plain, lean = tmp_path / "plain", tmp_path / "lean"
    run_in_process("hmt_finetune_single_device", demo_config(plain, max_steps_per_epoch=3))
    run_in_process("hmt_finetune_single_device", demo_config(
        lean, max_steps_per_epoch=3, segment_checkpointing=True, log_all_segments=False))
    a, b = read_metrics(plain / "logs"), read_metrics(lean / "logs")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6)
        assert b[step]["ppl_last_segment"] == pytest.approx(a[step]["ppl_last_segment"], rel=1e-5)
        assert "ppl_all_segments" in a[step] and "ppl_all_segments" not in b[step]


def test_loss_only_outputs_on_a_single_segment():
    """One segment, fresh: no representation pass at all, the same loss and gradients."""
    model = hmt_tiny(**SMALL).train()
    batch = _batch([15, 12], 15)
    _same(_step(model, batch, "last"), _step(model, batch, "last", log_all_segments=False))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_recipe_with_segment_checkpointing_matches_single_device(tmp_path):
    """FSDP2 (2 gloo processes) recomputing each segment in backward, without the all-segment
    NLL, logs the losses of the plain single-device run with the same global batch (both with
    the HMT parameters in their own optimizer group, ``hmt_lr``)."""
    from hmt_plugin.bench.runs import read_metrics
    from tests.recipe_utils import demo_config, run_in_process, run_recipe, write_config

    single, dist = tmp_path / "single", tmp_path / "dist"
    run_in_process("hmt_finetune_single_device", demo_config(
        single, batch_size=4, max_steps_per_epoch=2, save_every_n_steps=None, hmt_lr=1e-2))
    cfg = demo_config(dist, batch_size=2, max_steps_per_epoch=2, save_every_n_steps=None,
                      segment_checkpointing=True, log_all_segments=False, hmt_lr=1e-2)
    run_recipe("hmt_finetune_distributed", write_config(cfg, tmp_path / "d.yaml"), nproc=2)
    a, b = read_metrics(single / "logs"), read_metrics(dist / "logs")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-5), step
        assert b[step]["hmt_lr"] == pytest.approx(a[step]["hmt_lr"], rel=1e-9), step
