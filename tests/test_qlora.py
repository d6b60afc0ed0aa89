"""QLoRA HMT: NF4 base weights (torchao), LoRA adapters and HMT parameters trained."""

import pytest
import torch
from omegaconf import OmegaConf
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.training import FullModelHFCheckpointer

from hmt_plugin.bench.runs import read_metrics
from hmt_plugin.checkpointing import load_hmt_checkpoint
from hmt_plugin.cli import config_path
from hmt_plugin.models import qlora_hmt_tiny
from hmt_plugin.training.model_setup import lora_settings, set_trainable
from tests.recipe_utils import run_in_process

# Dims NF4 can quantize: every frozen weight holds a multiple of 64 * 256 elements.
NF4_DIMS = dict(vocab_size=64, embed_dim=128, num_heads=4, num_kv_heads=4, intermediate_dim=256)


def test_gradients_reach_lora_and_hmt_parameters_not_nf4_weights():
    model = qlora_hmt_tiny(["q_proj", "v_proj"], apply_lora_to_mlp=True, segment_length=32,
                           num_sensory=4, **NF4_DIMS)
    set_trainable(model, lora_settings(model))
    nf4 = [(n, p) for n, p in model.named_parameters() if isinstance(p, NF4Tensor)]
    assert nf4 and all(not p.requires_grad for _, p in nf4)
    ids = torch.randint(0, 64, (2, 70))
    out = model(ids, labels=ids, logits="none")
    out.nll.sum().backward()
    for name in ("initial_memory", "summary_token", "recall.q_proj.weight", "recall.k_proj.weight",
                 "backbone.layers.0.attn.q_proj.lora_b.weight", "backbone.layers.1.mlp.w1.lora_b.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for _, p in nf4)


def qlora_config(out, **overrides):
    cfg = OmegaConf.load(config_path("tiny/hmt_qlora_cpu"))
    cfg.output_dir = str(out)
    cfg.dataset.num_documents = 128
    cfg.batch_size = 8
    cfg.max_steps_per_epoch = 8
    cfg.save_every_n_steps = 4
    cfg.log_every_n_steps = 1
    cfg.validation = None
    cfg.optimizer.lr = 1e-2
    cfg.lr_scheduler = None
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": str(out / "logs")}
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.mark.slow
def test_qlora_recipe_trains_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    run_in_process("hmt_finetune_single_device", qlora_config(out))
    losses = [m["loss"] for _, m in sorted(read_metrics(out / "logs").items())]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses

    # The final checkpoint: NF4 base dequantized, LoRA merged, read by torchtune's checkpointer.
    final = out / "final"
    state = FullModelHFCheckpointer(
        checkpoint_dir=str(final), checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA3", output_dir=str(tmp_path / "reread"),
    ).load_checkpoint()["model"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    hmt_state, cfg, _ = load_hmt_checkpoint(final)
    assert cfg.mode == "hmt" and all(v.dtype == torch.float32 for v in hmt_state.values())

    # Resume from the step-4 checkpoint (NF4 base from the original checkpoint + adapters).
    resumed = tmp_path / "resumed"
    import shutil
    shutil.copytree(out / "step_0000004", resumed / "step_0000004")
    run_in_process("hmt_finetune_single_device", qlora_config(resumed, resume_from_checkpoint=True,
                                                              **{"checkpointer.checkpoint_dir": str(out / "backbone")}))
    again = read_metrics(resumed / "logs")
    original = read_metrics(out / "logs")
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        assert again[step]["loss"] == pytest.approx(original[step]["loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_qlora_distributed_matches_single_device(tmp_path):
    from tests.recipe_utils import run_recipe, write_config

    single, dist = tmp_path / "single", tmp_path / "dist"
    settings = dict(max_steps_per_epoch=2, save_every_n_steps=None, lr_scheduler=None)
    run_in_process("hmt_finetune_single_device", qlora_config(single, batch_size=4, **settings))
    cfg = write_config(qlora_config(dist, batch_size=2, **settings), tmp_path / "d.yaml")
    run_recipe("hmt_finetune_distributed", cfg, nproc=2)
    ls, ld = read_metrics(single / "logs"), read_metrics(dist / "logs")
    assert sorted(ls) == sorted(ld) == [1, 2]
    for step in ls:
        assert ld[step]["loss"] == pytest.approx(ls[step]["loss"], abs=1e-4), step
