"""Named HMT builders, in the style of torchtune's ``_model_builders.py``.

Each takes its torchtune backbone builder's arguments (the LoRA ones: torchtune's LoRA
arguments) and the HMT settings of :func:`~hmt_plugin.models.hmt` as keyword arguments. The
HMT parameters are trainable in LoRA setups (``HMT.adapter_params``)."""

import inspect
from functools import partial
from typing import Any, Callable

from torchtune.models.llama2 import llama2_7b, lora_llama2_7b
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.models.llama3_2 import llama3_2_1b, lora_llama3_2_1b
from torchtune.models.qwen2_5 import lora_qwen2_5_0_5b, qwen2_5_0_5b
from torchtune.modules import TransformerDecoder

from hmt_plugin.models._hmt_builder import hmt
from hmt_plugin.modules.hmt import HMT


def _named_builder(name: str, doc: str, backbone: Callable[..., TransformerDecoder]) -> Callable[..., HMT]:
    """A named builder: the arguments ``backbone`` takes build the decoder, the others are
    :func:`hmt`'s settings.

    Its signature is ``backbone``'s followed by ``**hmt_settings``: torchtune's config tools
    and our config check read what a builder accepts from it, so each builder's arguments are
    stated once, by its backbone builder."""
    backbone_params = inspect.signature(backbone).parameters

    def builder(*args: Any, **kwargs: Any) -> HMT:
        hmt_settings = {k: kwargs.pop(k) for k in list(kwargs) if k not in backbone_params}
        return hmt(backbone(*args, **kwargs), **hmt_settings)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    builder.__signature__ = inspect.Signature(
        [
            *backbone_params.values(),
            inspect.Parameter("hmt_settings", inspect.Parameter.VAR_KEYWORD, annotation=Any),
        ],
        return_annotation=HMT,
    )
    return builder


# A tiny Llama-architecture backbone for tests, demos and CPU runs: torchtune's llama3
# component builder (it takes rope_base; untied output like Llama 2).
_TINY = dict(
    vocab_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=128,
    max_seq_len=512,
    rope_base=10_000.0,
    norm_eps=1e-5,
)

hmt_llama2_7b = _named_builder(
    "hmt_llama2_7b", "HMT around Llama 2 7B (:func:`torchtune.models.llama2.llama2_7b`).", llama2_7b
)
lora_hmt_llama2_7b = _named_builder(
    "lora_hmt_llama2_7b",
    "HMT around Llama 2 7B with LoRA (:func:`torchtune.models.llama2.lora_llama2_7b`).",
    lora_llama2_7b,
)
hmt_llama3_2_1b = _named_builder(
    "hmt_llama3_2_1b", "HMT around Llama 3.2 1B (tied embeddings).", llama3_2_1b
)
lora_hmt_llama3_2_1b = _named_builder(
    "lora_hmt_llama3_2_1b", "HMT around Llama 3.2 1B with LoRA.", lora_llama3_2_1b
)
hmt_qwen2_5_0_5b = _named_builder(
    "hmt_qwen2_5_0_5b", "HMT around Qwen2.5 0.5B (tied embeddings).", qwen2_5_0_5b
)
lora_hmt_qwen2_5_0_5b = _named_builder(
    "lora_hmt_qwen2_5_0_5b", "HMT around Qwen2.5 0.5B with LoRA.", lora_qwen2_5_0_5b
)
hmt_tiny = _named_builder(
    "hmt_tiny",
    "A tiny Llama-architecture HMT for tests, demos and CPU runs (torchtune's ``llama3`` "
    "component builder, which takes ``rope_base``; untied output like Llama 2).",
    partial(llama3, **_TINY),
)
lora_hmt_tiny = _named_builder(
    "lora_hmt_tiny",
    ":func:`hmt_tiny` with LoRA adapters.",
    partial(lora_llama3, **_TINY, lora_rank=8, lora_alpha=16),
)

qlora_hmt_llama2_7b = partial(lora_hmt_llama2_7b, quantize_base=True)
qlora_hmt_llama2_7b.__doc__ = "QLoRA: :func:`lora_hmt_llama2_7b` with NF4 base weights."
qlora_hmt_llama3_2_1b = partial(lora_hmt_llama3_2_1b, quantize_base=True)
qlora_hmt_llama3_2_1b.__doc__ = "QLoRA: :func:`lora_hmt_llama3_2_1b` with NF4 base weights."
qlora_hmt_qwen2_5_0_5b = partial(lora_hmt_qwen2_5_0_5b, quantize_base=True)
qlora_hmt_qwen2_5_0_5b.__doc__ = "QLoRA: :func:`lora_hmt_qwen2_5_0_5b` with NF4 base weights."
qlora_hmt_tiny = partial(lora_hmt_tiny, quantize_base=True)
qlora_hmt_tiny.__doc__ = "QLoRA: :func:`lora_hmt_tiny` with NF4 base weights."
