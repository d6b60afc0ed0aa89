"""The generic builder: HMT around any torchtune decoder builder."""

from typing import Any, Callable, Mapping, Optional, Union

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


def hmt(
    backbone: BackboneSpec,
    *,
    mode: str = "hmt",
    segment_length: int = 256,
    num_memory_tokens: int = 1,
    num_sensory: int = 32,
    sum_fraction: float = 0.5,
    recall_hidden_dim: Optional[int] = None,
    cache_size: int = 300,
    bptt_depth: int = 2,
    score_scale: str = "sqrt",
    recall_dtype: Optional[str] = None,
    memory_init: str = "mean_embedding",
) -> HMT:
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
        **settings: see :class:`~hmt_plugin.modules.HMTConfig` (defaults follow the paper:
            one memory embedding, k = 32, sum_fraction 0.5, N = 300).

    Returns:
        HMT: the wrapped model; ``model.backbone`` is the decoder, keys unchanged.
    """
    config = HMTConfig(
        segment_length=segment_length,
        mode=mode,
        num_memory_tokens=num_memory_tokens,
        num_sensory=num_sensory,
        sum_fraction=sum_fraction,
        recall_hidden_dim=recall_hidden_dim,
        cache_size=cache_size,
        bptt_depth=bptt_depth,
        score_scale=score_scale,
        recall_dtype=recall_dtype,
        memory_init=memory_init,
    )
    return HMT(build_backbone(backbone), config)
