"""Faults a training run survives, on CPU in float32: a kill at any step or in the middle of a
checkpoint write, an exception inside torchtune's save, a full disk, a diverging loss, a rank
that dies or stalls. Each leaves the last complete checkpoint intact and loadable, and resuming
from it ends with the same weights as a run that was never interrupted.

tests/README.md lists these faults with the message each one gives.
"""

import errno
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchtune.training.checkpointing import _checkpointer as tt_checkpointer

from hmt_plugin.bench.runs import read_metrics
from hmt_plugin.checkpointing import load_hmt_checkpoint
from hmt_plugin.checkpointing import step_checkpoints as ckpt
from hmt_plugin.checkpointing.step_checkpoints import COMPLETE_MARKER, latest_checkpoint
from tests.recipe_utils import (
    HMT_TUNE,
    demo_config,
    env,
    run_in_process,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
SINGLE = "hmt_finetune_single_device"
STEPS = [1, 2, 3, 4, 5, 6]  # demo_config: 6 steps, a checkpoint every 2


def weights(directory: Path):
    """Everything a checkpoint holds that training changes: backbone and HMT parameters."""
    backbone = load_file(str(directory / "model-00001-of-00001.safetensors"))
    hmt, _, _ = load_hmt_checkpoint(directory)
    return {**backbone, **{f"hmt.{k}": v for k, v in hmt.items()}}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{a} and {b} differ in {different[:5]}"


def assert_loadable(checkpoint: Path) -> None:
    """A complete step checkpoint: marker, finite weights, readable training state."""
    assert (checkpoint / COMPLETE_MARKER).is_file()
    for name, value in weights(checkpoint).items():
        assert torch.isfinite(value).all(), name
    state = ckpt.load_recipe_state(checkpoint)
    assert state["global_step"] == int(checkpoint.name.split("_")[1])


def no_partials(output_dir: Path) -> None:
    litter = [p.name for p in output_dir.iterdir() if p.name.endswith((".partial", ".old"))]
    assert not litter, litter


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every fault is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    # A module fixture runs before conftest's per-test one thread; the runs it is compared
    # with use one, and the last bits of a float sum depend on how many threads share it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_in_process(SINGLE, demo_config(out))
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_losses(reference, tmp_path):
    again = tmp_path / "again"
    run_in_process(SINGLE, demo_config(again))
    expected, got = read_metrics(reference / "logs"), read_metrics(again / "logs")
    assert sorted(got) == STEPS
    # Bit for bit: ==, not approx.
    assert [got[s]["loss"] for s in STEPS] == [expected[s]["loss"] for s in STEPS]
    assert [got[s]["grad_norm"] for s in STEPS] == [expected[s]["grad_norm"] for s in STEPS]
    assert_same_weights(reference / "final", again / "final")

    # ...and the seed is what decides them (data order and HMT initialisation).
    other = tmp_path / "other_seed"
    run_in_process(SINGLE, demo_config(other, seed=4321))
    assert read_metrics(other / "logs")[1]["loss"] != expected[1]["loss"]


# ----------------------------------------------------------------------------- checkpoints
def test_latest_checkpoint_takes_only_complete_ones(tmp_path):
    for name, complete in [
        ("step_0000002", True),
        ("step_0000004", False),
        (".step_0000006.partial", False),
        ("step_0000003", True),
    ]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / COMPLETE_MARKER).write_text("{}")
    # A directory without the marker is a write that never finished, whatever its name.
    assert latest_checkpoint(tmp_path) == tmp_path / "step_0000003"
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert latest_checkpoint(tmp_path / "missing") is None


class Crash(Exception):
    """What a bug, or a failing file system, raises in the middle of torchtune's save."""


def test_exception_inside_torchtunes_save_keeps_the_previous_checkpoint(
    reference, tmp_path, monkeypatch
):
    original = tt_checkpointer.FullModelHFCheckpointer.save_checkpoint
    calls = []

    def crash_on_second_save(self, *args, **kwargs):
        calls.append(self._output_dir)
        original(self, *args, **kwargs)  # the shard is written...
        if len(calls) == 2:
            raise Crash("the save of step 4 died half way")  # ...and the rest never is

    monkeypatch.setattr(
        tt_checkpointer.FullModelHFCheckpointer, "save_checkpoint", crash_on_second_save
    )
    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_in_process(SINGLE, demo_config(out))
    assert calls[1].name == ".step_0000004.partial"

    assert latest_checkpoint(out) == out / "step_0000002"
    assert not (out / "step_0000004").exists()
    no_partials(out)
    assert_loadable(out / "step_0000002")
    assert_same_weights(out / "step_0000002", reference / "step_0000002")

    monkeypatch.undo()
    run_in_process(SINGLE, demo_config(out, resume_from_checkpoint=True))
    assert_same_weights(out / "final", reference / "final")


@pytest.mark.parametrize("where", ["backbone shard", "recipe state"])
def test_disk_full_while_saving(reference, tmp_path, monkeypatch, where):
    """ENOSPC half way through a file: a clear error, the staging directory removed, the
    previous checkpoint complete, and a resume (once there is space) loses nothing."""

    def fill_then_fail(path):
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "backbone shard":
        original = tt_checkpointer.save_file

        def save_file(tensors, path, *args, **kwargs):
            if "step_0000004" in str(path):
                fill_then_fail(path)
            return original(tensors, path, *args, **kwargs)

        monkeypatch.setattr(tt_checkpointer, "save_file", save_file)
    else:
        original = torch.save

        def save(obj, path, *args, **kwargs):
            if "step_0000004" in str(path) and "recipe_state" in str(path):
                fill_then_fail(path)
            return original(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)

    out = tmp_path / "run"
    with pytest.raises(OSError) as info:
        run_in_process(SINGLE, demo_config(out))
    err = info.value
    assert isinstance(err, ckpt.CheckpointError) and err.errno == errno.ENOSPC
    message = str(err)
    for part in (
        "no space left",
        "'step_0000004'",
        str(out),
        "partial write was removed",
        str(out / "step_0000002"),
        "is intact",
        "Free space",
        "resume_from_checkpoint=True",
    ):
        assert part in message, (part, message)

    no_partials(out)
    assert latest_checkpoint(out) == out / "step_0000002"
    assert_loadable(out / "step_0000002")

    monkeypatch.undo()
    run_in_process(SINGLE, demo_config(out, resume_from_checkpoint=True))
    assert_same_weights(out / "final", reference / "final")


# ----------------------------------------------------------------------------- divergence
def test_diverging_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr=1e10: step 1's update blows the weights up, step 2's loss is NaN."""
    out = tmp_path / "run"
    cfg = demo_config(out, **{"optimizer.lr": 1e10, "lr_scheduler": None, "save_every_n_steps": 1})
    with pytest.raises(FloatingPointError) as info:
        run_in_process(SINGLE, cfg)
    message = str(info.value)
    assert "the loss is nan at step 2" in message
    assert f"The last good checkpoint is {out / 'step_0000001'}" in message
    assert "Lower the learning rate" in message
    assert latest_checkpoint(out) == out / "step_0000001"
    assert not (out / "step_0000002").exists() and not (out / "final").exists()
    assert_loadable(out / "step_0000001")


def test_nan_at_a_later_step_then_resume(reference, tmp_path, monkeypatch):
    """A NaN loss at step 3 (a bad batch, injected): the run stops before the optimizer step,
    step 2 stays the newest checkpoint, and resuming from it matches the uninterrupted run."""
    import hmt_plugin.recipes.hmt_finetune_single_device as recipe

    original, calls = recipe.batch_loss, []

    def loss_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # one micro-batch per step: the third is step 3's
            loss.loss_sum = loss.loss_sum * float("nan")
        return loss

    monkeypatch.setattr(recipe, "batch_loss", loss_step)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3.*step_0000002"):
        run_in_process(SINGLE, demo_config(out))
    assert latest_checkpoint(out) == out / "step_0000002"
    assert_same_weights(out / "step_0000002", reference / "step_0000002")

    monkeypatch.undo()
    run_in_process(SINGLE, demo_config(out, resume_from_checkpoint=True))
    assert_same_weights(out / "final", reference / "final")


def test_weights_that_overflowed_are_never_checkpointed(tmp_path, monkeypatch):
    """An update that leaves inf in the weights while the step's loss was still finite: the
    save of that step is refused, so "the last good checkpoint" is never a broken one."""
    from hmt_plugin.recipes.hmt_finetune_single_device import HMTFinetuneRecipeSingleDevice as R

    original = R._optimizer_step

    def optimizer_step(self, *args):
        metrics = original(self, *args)
        if self.global_step == 2:
            with torch.no_grad():
                self._model.initial_memory[0, 0] = float("inf")
        return metrics

    monkeypatch.setattr(R, "_optimizer_step", optimizer_step)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        run_in_process(SINGLE, demo_config(out, save_every_n_steps=1))
    message = str(info.value)
    assert "not writing checkpoint 'step_0000002'" in message
    assert "'initial_memory'" in message and "NaN or inf" in message
    assert str(out / "step_0000001") in message
    assert latest_checkpoint(out) == out / "step_0000001"
    no_partials(out)


# ----------------------------------------------------------------------------- kills
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
            )
        if time.time() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)


def _sigkill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_in_child(tmp_path: Path, cfg: Path, patch: str = "") -> subprocess.Popen:
    """The recipe in a child interpreter (what `hmt-tune run` does, minus the CLI's own start-up
    time; tests/test_recipes.py kills a real `hmt-tune run`), after ``patch``, a test hook."""
    script = tmp_path / "child.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        + textwrap.dedent(patch)
        + textwrap.dedent(f"""
            from omegaconf import OmegaConf
            from tests.recipe_utils import run_in_process
            run_in_process({SINGLE!r}, OmegaConf.load({str(cfg)!r}))
        """)
    )
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write(reference, tmp_path):
    """A real SIGKILL while step 4's checkpoint is half written (its backbone and HMT files are
    in `.step_0000004.partial/`, the recipe state and the marker are not)."""
    out = tmp_path / "run"
    cfg = write_config(demo_config(out), tmp_path / "cfg.yaml")
    mid_write = tmp_path / "mid_write"
    # The HMT-file writer of the child pauses (for good) once it has written step 4's HMT
    # weights: the kill then lands at a known point of the write.
    proc = _run_in_child(
        tmp_path,
        cfg,
        patch=f"""
        import time
        from pathlib import Path
        import hmt_plugin.checkpointing.step_checkpoints as ckpt

        write = ckpt.save_hmt_checkpoint

        def paused(directory, *args, **kwargs):
            path = write(directory, *args, **kwargs)
            if ".step_0000004.partial" in str(directory):
                Path({str(mid_write)!r}).touch()
                time.sleep(3600)
            return path

        ckpt.save_hmt_checkpoint = paused
    """,
    )
    _wait_for(mid_write, proc)
    _sigkill(proc)

    staging = out / ".step_0000004.partial" / "epoch_0"
    assert (staging / "hmt_model.safetensors").is_file()
    assert not (staging / COMPLETE_MARKER).exists()
    assert not (out / "step_0000004").exists()
    assert latest_checkpoint(out) == out / "step_0000002"
    assert_loadable(out / "step_0000002")

    run_in_process(SINGLE, demo_config(out, resume_from_checkpoint=True))
    no_partials(out)  # the resumed run wrote step 4 again, over the leftover staging
    assert_same_weights(out / "final", reference / "final")


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume(reference, tmp_path):
    """SIGKILL as soon as step k is logged, k drawn at random (seeded; HMT_FAULT_SEED changes
    it): the kill lands in the middle of step k+1, or of step k's checkpoint write when k is
    even. Resuming from whatever is newest and complete ends bit-identical."""
    seed = int(os.environ.get("HMT_FAULT_SEED", "2404"))
    k = random.Random(seed).randint(2, 4)
    out = tmp_path / "run"
    cfg = write_config(demo_config(out), tmp_path / "cfg.yaml")
    proc = _run_in_child(tmp_path, cfg)
    start = time.time()
    while k not in read_metrics(out / "logs"):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {k}:\n{proc.stderr.read()[-3000:]}")
        assert time.time() - start < 240, f"step {k} was not logged"
        time.sleep(0.01)
    _sigkill(proc)
    assert not (out / "final").exists(), f"the run finished before the kill (k={k})"
    resumed_from = latest_checkpoint(out)
    # Killed before the first checkpoint was complete: there is nothing to resume, and the
    # run starts again (resume_from_checkpoint=True would say so and stop).
    run_in_process(SINGLE, demo_config(out, resume_from_checkpoint=resumed_from is not None))
    got, expected = read_metrics(out / "logs"), read_metrics(reference / "logs")
    assert sorted(got) == STEPS, (k, resumed_from)
    assert [got[s]["loss"] for s in STEPS] == [expected[s]["loss"] for s in STEPS], (
        k,
        resumed_from,
    )
    assert_same_weights(out / "final", reference / "final")


def _workers(pid: int):
    """{rank: pid} of torchrun's workers below ``pid`` (read from /proc: no psutil here)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        children[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), environ)
    below, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, (ppid, _) in children.items() if ppid in frontier} - below
        below |= frontier
    ranks = {}
    for child in below:
        for item in children[child][1]:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = child
    return ranks


def _start_two_ranks(tmp_path: Path, timeout_s: int):
    out = tmp_path / "run"
    cfg = demo_config(
        out,
        batch_size=2,
        max_steps_per_epoch=40,
        save_every_n_steps=2,
        distributed_timeout_s=timeout_s,
    )
    log = tmp_path / "torchrun.log"
    proc = subprocess.Popen(
        [
            *HMT_TUNE,
            "run",
            "--nproc_per_node",
            "2",
            "hmt_finetune_distributed",
            "--config",
            str(write_config(cfg, tmp_path / "cfg.yaml")),
        ],
        env=env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    start = time.time()
    while not (out / "step_0000002" / COMPLETE_MARKER).exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{log.read_text()[-4000:]}")
        if time.time() - start > 300:
            _sigkill(proc)
            raise AssertionError("step 2 was not reached")
        time.sleep(0.05)
    return proc, out, log


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_killed_mid_training_ends_the_job(tmp_path):
    """SIGKILL to rank 1 of 2: the job exits non-zero within seconds (torchrun tears down the
    survivor), names rank 1 and its signal, and the last checkpoint stays loadable."""
    proc, out, log = _start_two_ranks(tmp_path, timeout_s=60)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    killed = time.time()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        _sigkill(proc)
        raise AssertionError(f"the job hung after rank 1 died:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode != 0
    assert time.time() - killed < 90
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", text), text[-3000:]
    assert "Signal 9 (SIGKILL) received" in text
    assert latest_checkpoint(out) is not None
    assert_loadable(latest_checkpoint(out))
    assert not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_stalled_rank_fails_the_survivor_after_the_timeout(tmp_path):
    """Rank 1 stops (SIGSTOP: alive but silent, as a hung GPU or a swapped-out host). Rank 0
    gives up after distributed_timeout_s with an error that says what happened."""
    proc, out, log = _start_two_ranks(tmp_path, timeout_s=5)
    rank1 = _workers(proc.pid)[1]
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.time()
    try:
        while "collective operation with the other ranks failed" not in log.read_text():
            assert proc.poll() is None or "collective" in log.read_text(), log.read_text()[-4000:]
            assert time.time() - stopped < 90, "rank 0 waited past its timeout"
            time.sleep(0.1)
        waited = time.time() - stopped
    finally:
        # torchrun would give a stopped process 30 s to handle SIGTERM; end it now.
        os.kill(rank1, signal.SIGKILL)
        proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode != 0
    assert waited < 90
    assert re.search(
        r"rank 0 of 2: a collective operation with the other ranks failed after " r"step \d+ \(",
        text,
    ), text[-3000:]
    assert "distributed_timeout_s=5" in text and "resume_from_checkpoint=True" in text
    assert_loadable(latest_checkpoint(out))
