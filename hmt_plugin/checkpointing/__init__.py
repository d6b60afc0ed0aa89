from hmt_plugin.checkpointing.hf_backbone import (
    checkpointer_model_type,
    decoder_from_hf_config,
    read_hf_config,
)
from hmt_plugin.checkpointing.published import (
    hmt_config_from_published,
    load_published_hmt,
    split_published_state_dict,
)

__all__ = [
    "checkpointer_model_type",
    "decoder_from_hf_config",
    "hmt_config_from_published",
    "load_published_hmt",
    "read_hf_config",
    "split_published_state_dict",
]
