"""The wheel carries the recipes and configs, so `hmt-tune run` works without the source tree."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_subpackage_is_declared():
    declared = set(_declared_packages())
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "hmt_plugin").rglob("__init__.py")
    }
    assert found <= declared, sorted(found - declared)
    assert {"hmt_plugin.recipes", "hmt_plugin.configs"} <= declared


@pytest.mark.slow
def test_wheel_ships_recipes_and_configs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("hmt_torchtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in ROOT.glob("recipes/hmt_*.py"):
        assert f"hmt_plugin/recipes/{recipe.name}" in names
    for config in ROOT.glob("configs/*/*.yaml"):
        assert f"hmt_plugin/configs/{config.parent.name}/{config.name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
