"""The fine-tuning recipes end to end on CPU: single device (LoRA and full), checkpoints that
torchtune reads back, stop/resume, two stages, and 2-process FSDP2 on gloo."""

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from torchtune.training import FullModelHFCheckpointer

from hmt_plugin.bench.runs import read_metrics
from hmt_plugin.checkpointing import load_hmt_checkpoint
from hmt_plugin.checkpointing.step_checkpoints import COMPLETE_MARKER
from tests.recipe_utils import (
    HMT_TUNE,
    demo_config,
    env,
    lora_config,
    make_assets,
    run_in_process,
    run_recipe,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _weights(directory):
    return load_file(str(directory / "model-00001-of-00001.safetensors"))


def test_lora_run_writes_checkpoints_torchtune_reads(assets, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(lora_config(assets, out), tmp_path / "cfg.yaml")
    run_recipe("hmt_finetune_single_device", cfg)
    for name in ("step_0000002", "step_0000004", "final"):
        assert (out / name / COMPLETE_MARKER).is_file(), name
    assert (out / "step_0000002" / "adapter_model.pt").is_file()
    assert (out / "step_0000002" / "recipe_state.pt").is_file()
    metrics = read_metrics(out / "logs")
    assert sorted(metrics) == [1, 2, 3, 4]
    for step in metrics.values():
        assert all(torch.isfinite(torch.tensor(step[k])) for k in ("loss", "ppl_last_segment", "ppl_all_segments"))

    # The final checkpoint: LoRA merged, read by torchtune's own HF checkpointer.
    final = out / "final"
    state = FullModelHFCheckpointer(
        checkpoint_dir=str(final),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA2",
        output_dir=str(tmp_path / "reread"),
    ).load_checkpoint()["model"]
    base = FullModelHFCheckpointer(
        checkpoint_dir=str(assets["backbone"]),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA2",
        output_dir=str(tmp_path / "reread_base"),
    ).load_checkpoint()["model"]
    assert set(state) == set(base)
    changed = [k for k in base if not torch.equal(base[k], state[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    hmt_state, hmt_cfg, meta = load_hmt_checkpoint(final)
    assert set(hmt_state) == {"initial_memory", "summary_token", "recall.q_proj.weight", "recall.k_proj.weight"}
    assert hmt_cfg.mode == "hmt" and meta["final"] is True


def test_intermediate_save_does_not_change_live_weights(assets, tmp_path):
    """torchtune 0.6.1's LoRA recipe merges adapters into the live weights when it saves on
    CPU; here saving every step must give the same losses as never saving."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_in_process("hmt_finetune_single_device", lora_config(assets, a, save_every_n_steps=1))
    run_in_process("hmt_finetune_single_device", lora_config(assets, b, save_every_n_steps=None))
    la, lb = read_metrics(a / "logs"), read_metrics(b / "logs")
    assert [la[s]["loss"] for s in sorted(la)] == [lb[s]["loss"] for s in sorted(lb)]


def _kill_when(proc, path, timeout=240):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sigkill_then_resume_equals_uninterrupted(assets, tmp_path, kind):
    def config(out, **kw):
        if kind == "lora":
            return lora_config(assets, out, max_steps_per_epoch=6, **kw)
        return demo_config(out, max_steps_per_epoch=6, **kw)

    whole = tmp_path / "whole"
    run_in_process("hmt_finetune_single_device", config(whole))

    broken = tmp_path / "broken"
    cfg = write_config(config(broken), tmp_path / "b.yaml")
    proc = subprocess.Popen(
        [*HMT_TUNE, "run", "hmt_finetune_single_device", "--config", str(cfg)],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    _kill_when(proc, broken / "step_0000002" / COMPLETE_MARKER)
    assert not (broken / "final").exists()
    run_in_process("hmt_finetune_single_device", config(broken, resume_from_checkpoint=True))

    expected, got = read_metrics(whole / "logs"), read_metrics(broken / "logs")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step
        assert got[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-9), step
    wa, wb = _weights(whole / "final"), _weights(broken / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, _, _ = load_hmt_checkpoint(whole / "final")
    hb, _, _ = load_hmt_checkpoint(broken / "final")
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


def test_two_stage_training(assets, tmp_path):
    stage1 = tmp_path / "stage1"
    run_in_process("hmt_finetune_single_device", lora_config(assets, stage1, **{"model.mode": "hmt_stage1"}))
    s1_state, s1_cfg, _ = load_hmt_checkpoint(stage1 / "final")
    assert s1_cfg.mode == "hmt_stage1" and set(s1_state) == {"initial_memory"}

    stage2 = tmp_path / "stage2"
    cfg2 = lora_config(
        assets, stage2,
        **{"model.mode": "hmt", "model.bptt_depth": 3, "backbone_dir": str(stage1 / "final"),
           "checkpointer.checkpoint_files": ["model-00001-of-00001.safetensors"],
           "hmt_checkpoint": str(stage1 / "final"), "optimizer.lr": 0.0,
           "max_steps_per_epoch": 1},
    )
    run_in_process("hmt_finetune_single_device", cfg2)
    s2_state, s2_cfg, _ = load_hmt_checkpoint(stage2 / "final")
    assert s2_cfg.mode == "hmt" and "recall.q_proj.weight" in s2_state
    # lr 0: stage 2 holds exactly what it started from, stage 1's memory and backbone.
    assert torch.equal(s2_state["initial_memory"], s1_state["initial_memory"])
    w1, w2 = _weights(stage1 / "final"), _weights(stage2 / "final")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    missing = lora_config(assets, tmp_path / "bad", hmt_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="hmt_checkpoint=.*nope"):
        run_in_process("hmt_finetune_single_device", missing)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_process_fsdp_matches_single_device(assets, tmp_path, kind):
    def config(out, batch):
        if kind == "lora":
            return lora_config(assets, out, batch_size=batch, max_steps_per_epoch=3,
                               save_every_n_steps=None, shuffle=True)
        return demo_config(out, batch_size=batch, max_steps_per_epoch=3, save_every_n_steps=None)

    single, dist = tmp_path / "single", tmp_path / "dist"
    run_in_process("hmt_finetune_single_device", config(single, 4))
    run_recipe("hmt_finetune_distributed", write_config(config(dist, 2), tmp_path / "d.yaml"), nproc=2)
    ls, ld = read_metrics(single / "logs"), read_metrics(dist / "logs")
    assert sorted(ls) == sorted(ld) == [1, 2, 3]
    for step in ls:
        assert ld[step]["loss"] == pytest.approx(ls[step]["loss"], abs=1e-5), step
    ws, wd = _weights(single / "final"), _weights(dist / "final")
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_and_bf16(tmp_path):
    """torchtune's activation checkpointing wraps the decoder layers inside the HMT wrapper
    and recomputes exactly; bf16 trains and checkpoints in bf16."""
    plain, ac, bf16 = tmp_path / "plain", tmp_path / "ac", tmp_path / "bf16"
    run_in_process("hmt_finetune_single_device", demo_config(plain, max_steps_per_epoch=3))
    run_in_process("hmt_finetune_single_device", demo_config(
        ac, max_steps_per_epoch=3, enable_activation_checkpointing=True))
    a, b = read_metrics(plain / "logs"), read_metrics(ac / "logs")
    assert [a[s]["loss"] for s in (1, 2, 3)] == pytest.approx([b[s]["loss"] for s in (1, 2, 3)], abs=1e-6)

    run_in_process("hmt_finetune_single_device", demo_config(
        bf16, max_steps_per_epoch=3, dtype="bf16", enable_activation_checkpointing=True))
    losses = [m["loss"] for m in read_metrics(bf16 / "logs").values()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert _weights(bf16 / "final")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    hmt_state, _, _ = load_hmt_checkpoint(bf16 / "final")
    assert hmt_state["initial_memory"].dtype == torch.bfloat16
