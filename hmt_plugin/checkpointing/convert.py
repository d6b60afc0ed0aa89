"""Checkpoint conversion: the published HMT code's state dicts, our checkpoint directories,
plain Hugging Face directories and Meta's consolidated format, both ways. This module is
the entry point (``hmt-tune convert`` dispatches through :data:`CONVERSIONS`); each format
lives in its own module:

* ours (:mod:`~hmt_plugin.checkpointing.hmt_files`): what torchtune's
  ``FullModelHFCheckpointer`` writes for the backbone (HF shards + index + ``config.json``,
  and ``adapter_model.pt``/``adapter_model.safetensors``/``adapter_config.json`` for LoRA)
  plus ``hmt_model.safetensors`` and ``hmt_config.json``;
* the published code's (:mod:`~hmt_plugin.checkpointing.published`):
  :func:`convert_from_reference`, :func:`convert_to_reference`;
* Hugging Face's (:mod:`~hmt_plugin.checkpointing.hf_export`): :func:`export_hf`;
* Meta's (:mod:`~hmt_plugin.checkpointing.meta`): :func:`convert_to_meta`,
  :func:`convert_from_meta`;
* PEFT's LoRA keys (:mod:`~hmt_plugin.checkpointing.peft_keys`), used by the others.

Every converter reads its input lazily and writes through
:mod:`hmt_plugin.checkpointing.io` (HF shards one at a time, staged output directories).
"""

from typing import Callable, Dict

from hmt_plugin.checkpointing.hf_export import export_hf
from hmt_plugin.checkpointing.io import ConversionResult
from hmt_plugin.checkpointing.meta import (
    convert_from_meta,
    convert_to_meta,
    hf_config_from_meta,
    meta_params_from_hf,
)
from hmt_plugin.checkpointing.published import (
    convert_from_reference,
    convert_to_reference,
    published_args,
    published_settings,
)

# ``hmt-tune convert COMMAND INPUT -o OUTPUT``: each converter takes (input, output, **options).
CONVERSIONS: Dict[str, Callable[..., ConversionResult]] = {
    "from-reference": convert_from_reference,
    "to-reference": convert_to_reference,
    "export-hf": export_hf,
    "to-meta": convert_to_meta,
    "from-meta": convert_from_meta,
}

__all__ = [
    "CONVERSIONS",
    "ConversionResult",
    "convert_from_meta",
    "convert_from_reference",
    "convert_to_meta",
    "convert_to_reference",
    "export_hf",
    "hf_config_from_meta",
    "meta_params_from_hf",
    "published_args",
    "published_settings",
]
