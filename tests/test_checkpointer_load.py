"""torchtune's HF checkpointer fills the wrapped model's backbone, keys unchanged."""

import torch
from torchtune.training.checkpointing import FullModelHFCheckpointer

from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.backbone import embed_tokens, project, run_layers

from hmt_plugin.checkpointing.tiny_checkpoint import write_tiny_hf_llama


def test_hf_checkpoint_loads_into_wrapped_model(tmp_path):
    hf_dir = write_tiny_hf_llama(tmp_path / "hf", seed=3)
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(hf_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3",
        output_dir=str(tmp_path / "out"),
    )
    state = checkpointer.load_checkpoint()["model"]
    model = hmt_tiny(segment_length=32, num_sensory=4)
    # Every backbone key of the wrapper is a torchtune key under one prefix.
    assert {f"backbone.{k}" for k in state} == {k for k in model.state_dict() if k.startswith("backbone.")}
    model.backbone.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[f"backbone.{key}"], value)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        logits = project(model.backbone, run_layers(model.backbone, embed_tokens(model.backbone, ids)))
    assert torch.isfinite(logits).all() and logits.shape == (1, 20, 256)
