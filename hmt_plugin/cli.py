"""``hmt-tune``: torchtune's ``tune`` command, with the HMT recipes and configs registered.

    hmt-tune ls
    hmt-tune cp tiny/hmt_demo_cpu ./my_config.yaml
    hmt-tune run hmt_finetune_single_device --config tiny/hmt_demo_cpu
    hmt-tune run --nproc_per_node 2 hmt_finetune_distributed --config tiny/hmt_lora_cpu
    hmt-tune validate tiny/hmt_demo_cpu
    hmt-tune convert from-reference ...

torchtune's CLI knows only its own hard-coded recipe list, and it runs a recipe given by
path as a Python module, where torchtune's own installed top-level ``recipes`` package
shadows ours. So ``hmt-tune`` adds our recipes and configs to that list by absolute file
path (torchtune runs registered recipes by path, single device or under torchrun), then
hands over to torchtune's CLI. Recipes and configs ship inside the wheel as
``hmt_plugin.recipes`` / ``hmt_plugin.configs``.
"""

import sys
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

# recipe name -> (supports distributed, its configs)
_FINETUNE_CONFIGS = [
    "tiny/hmt_demo_cpu",
    "tiny/hmt_lora_cpu",
    "tiny/hmt_qlora_cpu",
    "llama2_7b/hmt_lora_pg19",
    "llama2_7b/hmt_qlora_pg19",
    "llama3_2_1b/hmt_stage1_lora",
    "llama3_2_1b/hmt_stage2_lora",
    "qwen2_5_0_5b/hmt_stage1_lora",
    "qwen2_5_0_5b/hmt_stage2_lora",
]
HMT_RECIPES: Dict[str, tuple] = {
    "hmt_finetune_single_device": (False, _FINETUNE_CONFIGS),
    "hmt_finetune_distributed": (True, _FINETUNE_CONFIGS),
    "hmt_eval": (False, ["tiny/hmt_eval_cpu", "llama2_7b/hmt_eval_pg19"]),
    "hmt_generate": (False, ["tiny/hmt_generate_cpu"]),
}


def recipe_path(name: str) -> Path:
    return Path(str(resources.files("hmt_plugin.recipes").joinpath(f"{name}.py")))


def config_path(name: str) -> Path:
    return Path(str(resources.files("hmt_plugin.configs").joinpath(f"{name}.yaml")))


def register() -> None:
    """Add the HMT recipes (those whose files exist) to torchtune's recipe registry."""
    from torchtune._recipe_registry import Config, Recipe, get_all_recipes

    registry = get_all_recipes()
    known = {r.name for r in registry}
    for name, (distributed, configs) in HMT_RECIPES.items():
        path = recipe_path(name)
        if name in known or not path.is_file():
            continue
        registry.append(
            Recipe(
                name=name,
                file_path=str(path),
                configs=[
                    Config(name=c, file_path=str(config_path(c)))
                    for c in configs
                    if config_path(c).is_file()
                ],
                supports_distributed=distributed,
            )
        )


def _resolve_config_names(argv: List[str]) -> List[str]:
    """``hmt-tune validate tiny/hmt_demo_cpu``: torchtune's validate takes a file path."""
    if len(argv) >= 2 and argv[0] == "validate" and not Path(argv[1]).is_file():
        candidate = config_path(argv[1])
        if candidate.is_file():
            return [argv[0], str(candidate), *argv[2:]]
    return argv


def _validate_ours(argv: List[str]) -> None:
    """Our checks: unknown keys, misspelled component arguments, values out of range."""
    from omegaconf import OmegaConf

    from hmt_plugin.training.run_config import validate_config_file

    cfg = OmegaConf.load(argv[1])
    validate_config_file(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from hmt_plugin.checkpointing.convert_cli import main as convert_main

        return convert_main(argv[1:])
    register()
    argv = _resolve_config_names(argv)
    if argv and argv[0] == "validate" and len(argv) >= 2:
        # Ours first: they name the misspelled key and suggest the right one.
        _validate_ours(argv)
        print("HMT checks passed.")
    from torchtune._cli.tune import main as tune_main

    sys.argv = ["tune", *argv]
    tune_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
