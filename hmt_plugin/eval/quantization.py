"""Weight-only quantization of an HMT model for long-document inference (torchao).

Only the backbone's ``nn.Linear`` layers are quantized by default (attention, MLP and an untied
output head): they hold nearly all of the weights. The HMT parameters stay as they are --
the memory embeddings are vectors, and the recall projections decide which memory a
segment reads, so they stay in full precision unless ``include_recall`` is set.
"""

from typing import Any, Dict, Optional

import torch
from torch import nn

from hmt_plugin.modules.hmt import HMT

SCHEMES = ("int8_weight_only", "int4_weight_only")


class QuantizationError(ValueError):
    """A quantization setting this platform or model cannot run."""


def _config(scheme: str, device: torch.device, group_size: int) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if device.type != "cuda":
        # torchao 0.15's CPU int4 layout needs the fbgemm-gpu-genai kernels, which do not
        # install beside torch 2.13's CPU build; its default int4 layout is CUDA's tinygemm.
        raise QuantizationError(
            "quantization.scheme=int4_weight_only needs a CUDA device here (torchao's int4 "
            "kernels); use int8_weight_only on CPU."
        )
    return Int4WeightOnlyConfig(group_size=group_size)


def quantize_for_inference(
    model: HMT,
    scheme: Optional[str],
    *,
    include_recall: bool = False,
    group_size: int = 128,
) -> Dict[str, Any]:
    """Quantize ``model`` in place for inference.

    Args:
        model (HMT): a loaded model (eval only: quantized weights are not trained).
        scheme (Optional[str]): ``"int8_weight_only"``, ``"int4_weight_only"`` (CUDA, bf16) or
            None (nothing to do).
        include_recall (bool): quantize the recall query/key projections too.
        group_size (int): int4 group size.

    Returns:
        Dict[str, Any]: what was done (scheme, quantized layer count, weight bytes before and
        after), for logs and benchmark records.
    """
    if scheme is None:
        return {"scheme": None}
    if scheme not in SCHEMES:
        raise QuantizationError(
            f"quantization.scheme={scheme!r} is unknown; use one of {', '.join(SCHEMES)} or null."
        )
    from torchao.quantization import quantize_

    device = next(model.parameters()).device
    if scheme == "int4_weight_only" and next(model.parameters()).dtype != torch.bfloat16:
        raise QuantizationError("quantization.scheme=int4_weight_only needs dtype=bf16.")
    targets = [model.backbone] + ([model.recall] if include_recall and hasattr(model, "recall") else [])
    before = _weight_bytes(model)
    count = 0
    for module in targets:
        count += sum(1 for m in module.modules() if type(m) is nn.Linear)
        quantize_(module, _config(scheme, device, group_size), filter_fn=_plain_linear)
    if count == 0:
        raise QuantizationError(
            "quantization found no nn.Linear layer to quantize (LoRA layers are not quantized: "
            "load the merged `final` checkpoint with a non-LoRA model builder)."
        )
    return {
        "scheme": scheme,
        "quantized_layers": count,
        "include_recall": include_recall,
        "weight_bytes_before": before,
        "weight_bytes_after": _weight_bytes(model),
    }


QUANTIZATION_KEYS = ("scheme", "include_recall", "group_size")


def quantize_from_config(model: HMT, node: Optional[Any]) -> Dict[str, Any]:
    """The ``quantization:`` section of an eval/generate config (null: full precision)::

        quantization:
          scheme: int8_weight_only     # or int4_weight_only (CUDA, bf16)
          include_recall: false        # the recall projections stay in full precision
          group_size: 128              # int4 only
    """
    if node is None:
        return {"scheme": None}
    from hmt_plugin.training.run_config import check_keys

    check_keys(node, QUANTIZATION_KEYS, "quantization.")
    info = quantize_for_inference(
        model,
        node.get("scheme"),
        include_recall=bool(node.get("include_recall", False)),
        group_size=int(node.get("group_size", 128)),
    )
    if info["scheme"] is not None:
        from torchtune import utils

        utils.get_logger("INFO").info(
            f"Quantized {info['quantized_layers']} backbone linear layers to {info['scheme']}: "
            f"{info['weight_bytes_before'] / 2**20:.1f} -> {info['weight_bytes_after'] / 2**20:.1f} "
            "MiB of weights."
        )
    return info


def _plain_linear(module: nn.Module, fqn: str) -> bool:
    # Exactly nn.Linear: LoRA/NF4 layers subclass nothing torchao's configs can convert.
    return type(module) is nn.Linear


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage (quantized tensors report their packed data)."""
    total = 0
    for p in model.parameters():
        data = p.data
        inner = getattr(data, "tensor_impl", None)
        if inner is not None:
            for name in ("int_data", "data", "packed_weight", "scale", "zero_point"):
                t = getattr(inner, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        else:
            total += data.numel() * data.element_size()
    return total
