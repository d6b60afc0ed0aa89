"""``bench vs-published`` and ``bench gpu-check`` at tiny sizes. The comparison needs a clone of
the published code (``HMT_PUBLISHED_SRC``, never shipped) and transformers: without them its
smoke test is skipped; the checks that guard it run everywhere."""

import json
import os
from pathlib import Path

import pytest
import torch

from hmt_plugin.bench import gpu_check, vs_published

PUBLISHED_SRC = os.environ.get("HMT_PUBLISHED_SRC")


def _published_available() -> bool:
    if not PUBLISHED_SRC or not (Path(PUBLISHED_SRC) / "modeling_rmt").is_dir():
        return False
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not _published_available(),
                    reason="set HMT_PUBLISHED_SRC to a clone of OswaldHe/HMT-pytorch and "
                           'pip install -e ".[published]"')
def test_vs_published_quick_writes_valid_json(tmp_path, restore_threads, capsys):
    out = tmp_path / "vs.json"
    vs_published.main(["--published-src", PUBLISHED_SRC, "--quick", "--no_rss", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["benchmark"] == "vs-published"
    parity = record["results"]["parity"]
    assert parity["loss_abs_diff"] < 1e-5 and parity["initial_memory_grad_rel_diff"] < 1e-4
    ev = record["results"]["eval"]
    assert {"published", "project", "bare_backbone"} <= set(ev)
    assert all(ev[k]["status"] == "ok" and ev[k]["tokens_per_s"] > 0
               for k in ("published", "project", "bare_backbone"))
    (train,) = record["results"]["train"]
    for name in ["published", *vs_published.PROJECT_VARIANTS]:
        assert train[name]["status"] == "ok", name
    for name in vs_published.PROJECT_VARIANTS:
        assert train[name]["speedup_wall"] > 0 and train[name]["peak_mb"] > 0
    # The checkpointed variants keep fewer activations than the default path.
    assert train["project_checkpointed"]["peak_mb"] < train["project"]["peak_mb"]
    assert "Same function" in capsys.readouterr().out


def test_vs_published_refuses_different_losses():
    assert vs_published.check_same_loss(2.0, 2.0 + 1e-7, 1e-5, "training loss") < 1e-5
    with pytest.raises(vs_published.PublishedCodeError, match="nothing is timed"):
        vs_published.check_same_loss(2.0, 2.1, 1e-5, "training loss")
    with pytest.raises(vs_published.PublishedCodeError):
        vs_published.check_same_loss(float("nan"), 2.0, 1e-5, "training loss")


def test_vs_published_names_a_wrong_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        vs_published.main(["--published-src", str(tmp_path), "--quick", "--out",
                           str(tmp_path / "x.json")])
    assert err.value.code == 2
    assert "clone of https://github.com/OswaldHe/HMT-pytorch" in capsys.readouterr().err


def test_published_runtime_shims_are_undone():
    cuda, bf16 = torch.Tensor.cuda, torch.Tensor.bfloat16
    x = torch.ones(2)
    with vs_published.published_runtime(torch.device("cpu"), fp32_recall=True):
        assert x.cuda() is x and x.bfloat16().dtype == torch.float32
    assert torch.Tensor.cuda is cuda and torch.Tensor.bfloat16 is bf16
    assert x.bfloat16().dtype == torch.bfloat16


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path, monkeypatch):
    """Every part of the GPU check at a tiny size on CPU: the speed and quantized benchmarks,
    the distributed recipe under torchrun (gloo, one process); SmolLM2 is skipped with a reason
    when its checkpoint is absent and cannot be made."""
    monkeypatch.setenv("HMT_SMOLLM2_DIR", str(tmp_path / "no_smollm2"))
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--quick", "--work_dir", str(tmp_path / "work"),
                    "--smollm2_script", str(tmp_path / "no_script.sh"), "--out", str(out)])
    record = json.loads(out.read_text())
    parts = record["results"]["parts"]
    assert set(parts) == set(gpu_check.PARTS)
    for name in ("speed", "int4", "fsdp2"):
        assert parts[name]["status"] == "ok", (name, parts[name].get("log_tail"))
    assert parts["speed"]["figures"]["eval"] and parts["speed"]["figures"]["train"]
    assert parts["int4"]["scheme"] == "int8_weight_only"
    assert parts["fsdp2"]["backend"] == "gloo"
    assert parts["fsdp2"]["figures"]["logged_steps"] == 3
    assert parts["smollm2"]["status"] == "skipped" and "no SmolLM2 checkpoint" in parts["smollm2"]["skipped"]
