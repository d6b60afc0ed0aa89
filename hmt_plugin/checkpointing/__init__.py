from hmt_plugin.checkpointing import convert
from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.convert import *  # noqa: F401,F403 - the converters, as convert.__all__ names them
from hmt_plugin.checkpointing.hf_backbone import (
    COVERED_ARCHITECTURES,
    checkpointer_model_type,
    decoder_from_hf_config,
)
from hmt_plugin.checkpointing.hf_checkpointer import hf_checkpointer, hf_weight_files
from hmt_plugin.checkpointing.hf_config import read_hf_config
from hmt_plugin.checkpointing.hmt_files import (
    HMT_CONFIG,
    HMT_WEIGHTS,
    check_hmt_state_dict,
    load_hmt_checkpoint,
    load_hmt_into,
    save_hmt_checkpoint,
)
from hmt_plugin.checkpointing.io import (
    ConversionError,
    HMTCheckpointError,
    atomic_write_bytes,
    open_state_dict,
)
from hmt_plugin.checkpointing.published import (
    hmt_config_from_published,
    load_published_hmt,
    split_published_state_dict,
)
from hmt_plugin.checkpointing.tiny_checkpoint import tiny_llama_checkpointer, write_tiny_hf_llama

__all__ = [
    "BackboneLayout",
    "COVERED_ARCHITECTURES",
    "ConversionError",
    "HMT_CONFIG",
    "HMT_WEIGHTS",
    "HMTCheckpointError",
    "atomic_write_bytes",
    "check_hmt_state_dict",
    "checkpointer_model_type",
    "decoder_from_hf_config",
    "hf_checkpointer",
    "hf_weight_files",
    "hmt_config_from_published",
    "load_hmt_checkpoint",
    "load_hmt_into",
    "load_published_hmt",
    "open_state_dict",
    "read_hf_config",
    "save_hmt_checkpoint",
    "split_published_state_dict",
    "tiny_llama_checkpointer",
    "write_tiny_hf_llama",
    *convert.__all__,
]
