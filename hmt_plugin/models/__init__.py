from hmt_plugin.models._hf_backbone import hf_backbone
from hmt_plugin.models._hmt_builder import build_backbone, hmt
from hmt_plugin.models._model_builders import (
    hmt_llama2_7b,
    hmt_llama3_2_1b,
    hmt_qwen2_5_0_5b,
    hmt_tiny,
    lora_hmt_llama2_7b,
    lora_hmt_llama3_2_1b,
    lora_hmt_qwen2_5_0_5b,
    lora_hmt_tiny,
    qlora_hmt_llama2_7b,
    qlora_hmt_llama3_2_1b,
    qlora_hmt_qwen2_5_0_5b,
    qlora_hmt_tiny,
)

__all__ = [
    "build_backbone",
    "hf_backbone",
    "hmt",
    "hmt_llama2_7b",
    "hmt_llama3_2_1b",
    "hmt_qwen2_5_0_5b",
    "hmt_tiny",
    "lora_hmt_llama2_7b",
    "lora_hmt_llama3_2_1b",
    "lora_hmt_qwen2_5_0_5b",
    "lora_hmt_tiny",
    "qlora_hmt_llama2_7b",
    "qlora_hmt_llama3_2_1b",
    "qlora_hmt_qwen2_5_0_5b",
    "qlora_hmt_tiny",
]
