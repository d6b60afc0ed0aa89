"""Weight-only quantized inference (torchao): backbone only, a stated tolerance."""

import copy

import pytest
import torch
from torchao.dtypes import AffineQuantizedTensor

from hmt_plugin.eval.quantization import QuantizationError, quantize_for_inference
from hmt_plugin.models import hmt_tiny

# int8 weight-only per-channel quantization keeps perplexity within 1% of float32 here.
PPL_TOLERANCE = 0.01


def model():
    torch.manual_seed(0)
    return hmt_tiny(segment_length=64, num_sensory=8, embed_dim=256, num_heads=4,
                    num_kv_heads=4, intermediate_dim=512, recall_hidden_dim=64).eval()


def test_int8_quantizes_the_backbone_only_within_tolerance():
    full = model()
    quant = copy.deepcopy(full)
    info = quantize_for_inference(quant, "int8_weight_only")
    assert info["quantized_layers"] == 2 * 7 + 1  # q, k, v, o, w1, w2, w3 per layer + output
    assert info["weight_bytes_after"] < 0.6 * info["weight_bytes_before"]
    assert isinstance(quant.backbone.layers[0].attn.q_proj.weight, AffineQuantizedTensor)
    assert not isinstance(quant.recall.q_proj.weight, AffineQuantizedTensor)
    assert torch.equal(quant.initial_memory, full.initial_memory)

    ids = torch.randint(0, 256, (2, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = full(ids, labels=ids, logits="none").nll[:, 1:].mean().exp()
        b = quant(ids, labels=ids, logits="none").nll[:, 1:].mean().exp()
    assert abs(b / a - 1) < PPL_TOLERANCE, (a, b)


def test_recall_projections_quantized_only_when_asked():
    quant = model()
    quantize_for_inference(quant, "int8_weight_only", include_recall=True)
    assert isinstance(quant.recall.k_proj.weight, AffineQuantizedTensor)


@pytest.mark.parametrize(
    "scheme, match",
    [("int3", "quantization.scheme='int3' is unknown"), ("int4_weight_only", "needs")],
)
def test_unsupported_schemes_are_named(scheme, match):
    with pytest.raises(QuantizationError, match=match):
        quantize_for_inference(model(), scheme)


def test_eval_recipe_reads_quantized_within_tolerance(tmp_path):
    from tests.test_eval_recipe import eval_assets, eval_config, run_in_process

    assets = eval_assets(tmp_path / "assets")
    common = {"context_lengths": [60], "max_tokens": 120, "modes": ["hmt"], "plots": False,
              "memory_probe": "none"}
    full = run_in_process(eval_config(assets, tmp_path / "full", **common))
    quant = run_in_process(eval_config(
        assets, tmp_path / "int8", **common, quantization={"scheme": "int8_weight_only"}))
    assert quant["quantization"]["scheme"] == "int8_weight_only"
    for run, scores in full["runs"].items():
        a = scores["document"]["ppl"]
        b = quant["runs"][run]["document"]["ppl"]
        assert abs(b / a - 1) < PPL_TOLERANCE, (run, a, b)
