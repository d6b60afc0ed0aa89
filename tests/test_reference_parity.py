"""The plugin computes what the published HMT code computes, on its own reference outputs.

The case directory comes from ``HMT_REFERENCE_CASE``, else ``../shared/reference/case_a``
when it exists; without either the test skips. Any case produced the same way must pass
(other sizes, GQA ratios, rope theta, segment length, k, d_h, cache sizes, kept segments,
partial last segments, batch sizes)."""

import json
import os
from pathlib import Path

import pytest
import torch
from torchtune.training.checkpointing import FullModelHFCheckpointer

from hmt_plugin.checkpointing import (
    checkpointer_model_type,
    decoder_from_hf_config,
    hmt_config_from_published,
    load_published_hmt,
)
from hmt_plugin.modules import HMT

TOL = 1e-4


def _case_dir():
    env = os.environ.get("HMT_REFERENCE_CASE")
    if env:
        return Path(env)
    default = Path(__file__).resolve().parents[2] / "shared" / "reference" / "case_a"
    return default if default.is_dir() else None


CASE = _case_dir()
pytestmark = pytest.mark.skipif(CASE is None, reason="no reference case (set HMT_REFERENCE_CASE)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    case = json.loads((CASE / "case.json").read_text())
    hf_dir = CASE / "hf_model"
    decoder = decoder_from_hf_config(hf_dir)
    # torchtune's own HF -> torchtune conversion, through its checkpointer.
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(hf_dir),
        checkpoint_files=sorted(p.name for p in hf_dir.glob("*.safetensors")),
        model_type=checkpointer_model_type(hf_dir),
        output_dir=str(tmp_path_factory.mktemp("ckpt_out")),
    )
    decoder.load_state_dict(checkpointer.load_checkpoint()["model"])
    model = HMT(decoder, hmt_config_from_published(case))
    load_published_hmt(model, CASE / "reference_hmt.pt")
    golden = torch.load(CASE / "golden.pt", weights_only=True)
    ids = golden["input_ids"]
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids, logits=int(case["num_seg_save"]))
    return case, golden, out, model


def test_logits(reference):
    case, golden, out, _ = reference
    expected = golden["logits"]
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, atol=TOL, rtol=0)


def test_memories_and_queries(reference):
    _, golden, out, _ = reference
    torch.testing.assert_close(out.memories, golden["memories"], atol=TOL, rtol=0)
    torch.testing.assert_close(out.summaries, golden["queries"], atol=TOL, rtol=0)


def test_last_segment_loss(reference):
    # The published loss: the last `block_size` targets (its mask_size).
    case, golden, out, model = reference
    block = model.config.tokens_per_segment
    assert block == case["block_size"]
    loss = out.nll[:, -block:].mean()
    assert abs(loss.item() - golden["loss"].item()) < TOL


def test_recall_distances(reference):
    _, golden, out, _ = reference
    if "recall_argmax_distance" not in golden:
        pytest.skip("case has no recall distances")
    distance = out.recall_distance()[:, 1:].T.reshape(-1)
    assert distance.tolist() == golden["recall_argmax_distance"].tolist()
