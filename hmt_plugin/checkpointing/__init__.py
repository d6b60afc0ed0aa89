from hmt_plugin.checkpointing.hf_backbone import (
    COVERED_ARCHITECTURES,
    checkpointer_model_type,
    decoder_from_hf_config,
    read_hf_config,
)
from hmt_plugin.checkpointing.hf_checkpointer import hf_checkpointer, hf_weight_files
from hmt_plugin.checkpointing.published import (
    hmt_config_from_published,
    load_published_hmt,
    split_published_state_dict,
)

__all__ = [
    "COVERED_ARCHITECTURES",
    "checkpointer_model_type",
    "decoder_from_hf_config",
    "hf_checkpointer",
    "hf_weight_files",
    "hmt_config_from_published",
    "load_published_hmt",
    "read_hf_config",
    "split_published_state_dict",
]
from hmt_plugin.checkpointing.tiny_checkpoint import tiny_llama_checkpointer, write_tiny_hf_llama
from hmt_plugin.checkpointing.hmt_files import (
    HMT_CONFIG,
    HMT_WEIGHTS,
    HMTCheckpointError,
    atomic_write_bytes,
    check_hmt_state_dict,
    load_hmt_checkpoint,
    load_hmt_into,
    save_hmt_checkpoint,
)

__all__ += [
    "tiny_llama_checkpointer",
    "write_tiny_hf_llama",
    "HMT_CONFIG",
    "HMT_WEIGHTS",
    "HMTCheckpointError",
    "atomic_write_bytes",
    "check_hmt_state_dict",
    "load_hmt_checkpoint",
    "load_hmt_into",
    "save_hmt_checkpoint",
]
from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.convert import (
    ConversionResult,
    convert_from_meta,
    convert_from_reference,
    convert_to_meta,
    convert_to_reference,
    export_hf,
)
from hmt_plugin.checkpointing.io import ConversionError, open_state_dict

__all__ += [
    "BackboneLayout",
    "ConversionError",
    "ConversionResult",
    "convert_from_meta",
    "convert_from_reference",
    "convert_to_meta",
    "convert_to_reference",
    "export_hf",
    "open_state_dict",
]
