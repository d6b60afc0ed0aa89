"""The generic builder: HMT around any torchtune decoder builder."""

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Union

from omegaconf import OmegaConf
from torch import nn
from torchtune import config as tt_config
from torchtune.config._utils import _get_component_from_path

from hmt_plugin.modules.hmt import HMT
from hmt_plugin.modules.hmt_config import HMTConfig

BackboneSpec = Union[nn.Module, Mapping[str, Any], str, Callable[[], nn.Module]]


def build_backbone(backbone: BackboneSpec) -> nn.Module:
    """A decoder from a module, a builder, a dotted builder path, or a config node with a
    ``_component_`` (torchtune 0.6.1's ``config.instantiate`` does not build nested nodes,
    so the HMT builder does it for its ``backbone`` argument)."""
    if isinstance(backbone, nn.Module):
        return backbone
    if isinstance(backbone, Mapping):
        if "_component_" not in backbone:
            raise ValueError(
                "model.backbone needs a `_component_` naming a torchtune decoder builder, e.g. "
                "torchtune.models.llama2.lora_llama2_7b."
            )
        return tt_config.instantiate(OmegaConf.create(dict(backbone)))
    if isinstance(backbone, str):
        return _get_component_from_path(backbone)()
    if callable(backbone):
        return backbone()
    raise TypeError(
        f"backbone must be a module, a builder or a config node; got {type(backbone).__name__}."
    )


def hmt(backbone: BackboneSpec, **settings: Any) -> HMT:
    """Wrap a torchtune decoder with HMT. Usable as ``_component_`` in a YAML config::

        model:
          _component_: hmt_plugin.models.hmt
          backbone:
            _component_: torchtune.models.llama3_2.lora_llama3_2_1b
            lora_attn_modules: [q_proj, v_proj]
          segment_length: 1024
          num_sensory: 32

    Args:
        backbone: the decoder, its builder, a dotted path to a builder taking no arguments,
            or a config node with ``_component_`` and the builder's arguments.
        **settings: the fields of :class:`~hmt_plugin.modules.HMTConfig`, with its defaults
            (the paper's: one memory embedding, k = 32, sum_fraction 0.5, N = 300).

    Returns:
        HMT: the wrapped model; ``model.backbone`` is the decoder, keys unchanged.
    """
    return HMT(build_backbone(backbone), HMTConfig(**settings))


# torchtune's config tools and our config check read what a builder accepts from its
# signature: here HMTConfig's fields, so the defaults are stated once, in HMTConfig.
hmt.__signature__ = inspect.Signature(
    [inspect.Parameter("backbone", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=BackboneSpec)]
    + [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in dataclasses.fields(HMTConfig)
    ],
    return_annotation=HMT,
)
