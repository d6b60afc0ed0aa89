"""The body of a single-process recipe's ``recipe_main``, as torchtune's recipes write it."""

from typing import Any

from omegaconf import DictConfig
from torchtune import config


def run_recipe(recipe_cls: Any, cfg: DictConfig, run: str) -> None:
    """Log the config, build the recipe, then ``setup``, the recipe's ``run`` method
    (``train``, ``evaluate``, ``generate``) and ``cleanup``."""
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    recipe = recipe_cls(cfg=cfg)
    recipe.setup(cfg=cfg)
    getattr(recipe, run)()
    recipe.cleanup()
