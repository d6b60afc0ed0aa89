"""`hmt-tune` knows our recipes and configs; every shipped config validates; a copied recipe
runs with plain `tune run`; the named builders build the real architectures."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import hmt_plugin.models as models
from hmt_plugin.cli import HMT_RECIPES, config_path, main, recipe_path
from hmt_plugin.training.run_config import ConfigError, validate_config_file
from tests.recipe_utils import HMT_TUNE, demo_config, run, write_config

SHIPPED = sorted(
    str(p.relative_to(config_path("x").parent).with_suffix(""))
    for p in Path(config_path("x").parent).rglob("*.yaml")
)


def cli(capsys, *argv):
    """``hmt-tune <argv>`` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code or 0, out.out, out.err


def test_console_script_lists_our_recipes_beside_torchtunes():
    out = run([*HMT_TUNE, "ls"]).stdout
    assert "lora_finetune_single_device" in out  # torchtune's own
    for name in HMT_RECIPES:
        if recipe_path(name).is_file():
            assert name in out
    assert "tiny/hmt_demo_cpu" in out


def test_cp_and_cat(tmp_path, capsys):
    cli(capsys, "cp", "hmt_finetune_single_device", str(tmp_path / "r.py"))
    cli(capsys, "cp", "tiny/hmt_demo_cpu", str(tmp_path / "c.yaml"))
    assert (tmp_path / "r.py").read_text() == recipe_path("hmt_finetune_single_device").read_text()
    assert "hmt_plugin.models.hmt_tiny" in (tmp_path / "c.yaml").read_text()
    assert "segment_length" in cli(capsys, "cat", "tiny/hmt_demo_cpu")[1]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name, capsys):
    code, out, _ = cli(capsys, "validate", name)
    assert code == 0 and "HMT checks passed" in out
    validate_config_file(OmegaConf.load(config_path(name)))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("model.num_sensroy", 4, "did you mean 'num_sensory'"),
        ("bacth_size", 4, "did you mean 'batch_size'"),
        ("windows.strid", 4, "did you mean 'stride'"),
        ("loss_scope", "first", "loss_scope='first'"),
        ("batch_size", 0, "batch_size=0"),
        ("dataset.num_documentz", 3, "did you mean 'num_documents'"),
    ],
)
def test_validate_names_misspelled_keys(tmp_path, capsys, key, value, match):
    cfg = demo_config(tmp_path)
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError, match=f"(?i){match}"):
        validate_config_file(cfg)
    with pytest.raises(ConfigError, match=f"(?i){match}"):
        cli(capsys, "validate", str(write_config(cfg, tmp_path / "bad.yaml")))


@pytest.mark.slow
def test_copied_recipe_runs_with_plain_tune_run(tmp_path):
    """`hmt-tune cp` then `tune run <file> --config <file>` from the user's own folder."""
    work = tmp_path / "work"
    work.mkdir()
    run([*HMT_TUNE, "cp", "hmt_finetune_single_device", str(work / "my_recipe.py")])
    cfg = demo_config(tmp_path / "out", max_steps_per_epoch=1, save_every_n_steps=None)
    write_config(cfg, work / "my_config.yaml")
    tune = str(Path(sys.executable).with_name("tune"))
    run([tune, "run", "my_recipe.py", "--config", "my_config.yaml"], cwd=work)
    assert (tmp_path / "out" / "final" / "hmt_model.safetensors").is_file()


BUILDERS = [
    ("hmt_llama2_7b", {}, 4096),
    ("lora_hmt_llama2_7b", {"lora_attn_modules": ["q_proj", "v_proj"]}, 4096),
    ("hmt_llama3_2_1b", {}, 2048),
    ("lora_hmt_llama3_2_1b", {"lora_attn_modules": ["q_proj", "v_proj"]}, 2048),
    ("hmt_qwen2_5_0_5b", {}, 896),
    ("lora_hmt_qwen2_5_0_5b", {"lora_attn_modules": ["q_proj", "v_proj"]}, 896),
]


@pytest.mark.parametrize("name, kwargs, dim", BUILDERS)
def test_named_builders(name, kwargs, dim):
    with torch.device("meta"):
        model = getattr(models, name)(**kwargs)
    cfg = model.config
    assert (cfg.num_memory_tokens, cfg.num_sensory, cfg.sum_fraction, cfg.cache_size) == (1, 32, 0.5, 300)
    shapes = {k: tuple(v.shape) for k, v in model.hmt_state_dict().items()}
    assert shapes == {
        "initial_memory": (1, dim), "summary_token": (1, dim),
        "recall.q_proj.weight": (dim, dim), "recall.k_proj.weight": (dim, dim),
    }
    total = sum(p.numel() for p in model.parameters())
    added = sum(p.numel() for p in model.hmt_state_dict().values())
    assert 0.001 < added / total < 0.02
    if name.startswith("lora"):
        assert set(model.adapter_params()) == set(shapes)
