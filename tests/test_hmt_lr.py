"""``hmt_lr``: the HMT parameters in their own optimizer group, at their own learning rate."""

import pytest
import torch
from omegaconf import OmegaConf

from hmt_plugin.models import hmt_tiny, lora_hmt_tiny
from hmt_plugin.training.loss import batch_loss
from hmt_plugin.training.model_setup import optimizer_params, set_trainable
from hmt_plugin.training.run_config import ConfigError, validate_finetune_config

SMALL = dict(segment_length=24, num_sensory=4, recall_hidden_dim=16, cache_size=3)


def _adamw_step(model, params):
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    tokens = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens, "seq_lens": torch.tensor([80, 80])}
    loss = batch_loss(model, batch, torch.device("cpu"), "all")
    (loss.loss_sum / loss.num_tokens).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("lora", [False, True])
def test_hmt_parameters_train_at_their_own_rate(lora):
    """With the backbone's rate at 0, exactly the HMT parameters move; without ``hmt_lr`` the
    optimizer gets the plain list of trainable parameters (nothing moves at rate 0)."""
    torch.manual_seed(0)
    model = (lora_hmt_tiny(["q_proj", "v_proj"], **SMALL) if lora else hmt_tiny(**SMALL)).train()
    set_trainable(model, {} if lora else None)
    hmt = set(model.hmt_parameter_names())
    groups = optimizer_params(model, hmt_lr=1e-2)
    assert [g.get("lr") for g in groups] == [None, 1e-2]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    moved = _adamw_step(model, groups)
    assert {n for n, m in moved.items() if m} == hmt
    plain = optimizer_params(model)
    assert all(isinstance(p, torch.nn.Parameter) for p in plain) and len(plain) == len(trainable)
    assert not any(_adamw_step(model, plain).values())


@pytest.mark.parametrize("value", ["fast", 0, -1e-3, True])
def test_hmt_lr_is_checked(value, tmp_path):
    from tests.recipe_utils import demo_config

    cfg = OmegaConf.create(demo_config(tmp_path, hmt_lr=value))
    with pytest.raises(ConfigError, match=r"hmt_lr=.* must be a number > 0"):
        validate_finetune_config(cfg)


@pytest.mark.slow
def test_recipe_schedules_both_rates_and_resumes_them(tmp_path):
    """The single-device recipe with ``hmt_lr``: the schedule scales both groups by the same
    factor, and a run resumed from its step-2 checkpoint ends with the uninterrupted run's
    weights (both groups' AdamW state restored)."""
    import shutil

    from hmt_plugin.bench.runs import read_metrics
    from hmt_plugin.checkpointing.hmt_files import load_hmt_checkpoint
    from tests.recipe_utils import demo_config, run_in_process

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_in_process("hmt_finetune_single_device", demo_config(whole, max_steps_per_epoch=4, hmt_lr=3e-2))
    logged = read_metrics(whole / "logs")
    lr = OmegaConf.create(demo_config(whole)).optimizer.lr
    assert sorted(logged) == [1, 2, 3, 4]
    for step, m in logged.items():
        assert m["hmt_lr"] / 3e-2 == pytest.approx(m["lr"] / lr, rel=1e-9), step

    shutil.copytree(whole / "step_0000002", cut / "step_0000002")
    run_in_process("hmt_finetune_single_device", demo_config(
        cut, max_steps_per_epoch=4, hmt_lr=3e-2, resume_from_checkpoint=True))
    assert sorted(read_metrics(cut / "logs")) == [3, 4]  # it resumed, not started over
    a, _, _ = load_hmt_checkpoint(whole / "final")
    b, _, _ = load_hmt_checkpoint(cut / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
