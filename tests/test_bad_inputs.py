"""The bad-input catalogue: each input is refused with a message that names the culprit (the
key, file, setting or value) and the fix. Everything runs in this process on tiny models.

tests/README.md lists these cases, with the ones covered by other test files.
"""

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict

import pytest
import torch

from hmt_plugin.checkpointing import HMTCheckpointError
from hmt_plugin.checkpointing.tiny_checkpoint import tiny_llama_checkpointer
from hmt_plugin.data import synthetic_recall_dataset
from hmt_plugin.data.text_sources import DataSourceError
from hmt_plugin.models import hmt_tiny
from hmt_plugin.modules.hmt_config import HMTConfigError
from hmt_plugin.checkpointing import step_checkpoints as ckpt
from hmt_plugin.training.data_setup import build_dataloader
from hmt_plugin.training.run_config import ConfigError
from tests.recipe_utils import demo_config, lora_config, make_assets, run_in_process

SINGLE = "hmt_finetune_single_device"
# demo_config's backbone, as its checkpointer writes it
DEMO_BACKBONE = dict(
    vocab_size=32, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_dim=128
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished demo run: step_0000002/4/6 and final."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run_in_process(SINGLE, demo_config(out))
    return out


@pytest.fixture
def ctx(tmp_path, assets, trained):
    return SimpleNamespace(tmp=tmp_path, assets=assets, trained=trained, out=tmp_path / "run")


def demo(c, **overrides):
    run_in_process(SINGLE, demo_config(c.out, **overrides))


def lora(c, **overrides):
    run_in_process(SINGLE, lora_config(c.assets, c.out, **overrides))


def copy_of_trained(c) -> Path:
    shutil.copytree(c.trained, c.out)
    return c.out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- recipe inputs
def truncated_backbone(c):
    # The demo's checkpointer writes its backbone only when the file is missing; here it is
    # there, cut in half (an interrupted download).
    tiny_llama_checkpointer(str(c.out / "backbone"), str(c.out), **DEMO_BACKBONE)
    truncate(c.out / "backbone" / "model.safetensors")
    demo(c)


def truncated_hmt_checkpoint(c):
    damaged = c.tmp / "stage1_final"
    shutil.copytree(c.trained / "final", damaged)
    truncate(damaged / "hmt_model.safetensors")
    demo(c, hmt_checkpoint=str(damaged))


def backbone_of_another_architecture(c):
    # A Qwen2-style checkpoint (attention biases) read as the Llama the config describes.
    from safetensors.torch import load_file, save_file

    backbone = c.tmp / "qwen_like"
    shutil.copytree(c.assets["backbone"], backbone)
    weights = load_file(str(backbone / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(backbone / "model.safetensors"))
    lora(c, backbone_dir=str(backbone))


def binary_file_in_text_folder(c):
    books = c.tmp / "books"
    shutil.copytree(c.assets["books"], books)
    (books / "scan.txt").write_bytes(bytes(range(256)) * 8)
    lora(c, **{"dataset.source": str(books)})


def empty_dataset_folder(c):
    (c.tmp / "empty").mkdir()
    lora(c, **{"dataset.source": str(c.tmp / "empty")})


def only_empty_documents(c):
    folder = c.tmp / "blank"
    folder.mkdir()
    for i in range(3):
        (folder / f"chapter_{i}.txt").write_text(" \n\n")
    lora(c, **{"dataset.source": str(folder)})


def stage2_without_stage1(c):
    # configs/*/hmt_stage2_lora.yaml: backbone and HMT parameters both from stage 1's `final`.
    stage1 = c.tmp / "stage1_never_run" / "final"
    lora(
        c,
        backbone_dir=str(stage1),
        hmt_checkpoint=str(stage1),
        **{"checkpointer.checkpoint_files": ["model-00001-of-00001.safetensors"]},
    )


def corrupt_recipe_state(c):
    out = copy_of_trained(c)
    shutil.rmtree(out / "final")
    (out / "step_0000006" / ckpt.RECIPE_STATE).write_bytes(b"not a pickle")
    demo(c, resume_from_checkpoint=True)


def _rewrite_recipe_state(path: Path, change: Callable[[Dict[str, Any]], None]) -> None:
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def resume_with_another_world_size(c):
    out = copy_of_trained(c)
    shutil.rmtree(out / "final")

    def as_if_two_ranks(state):
        # What hmt_finetune_distributed writes: one data position and RNG state per rank.
        state["world_size"] = state["settings"]["world_size"] = 2
        state["dataloader"] = [state["dataloader"]] * 2
        state["rng"] = [state["rng"]["cpu"]] * 2

    _rewrite_recipe_state(out / "step_0000006" / ckpt.RECIPE_STATE, as_if_two_ranks)
    demo(c, resume_from_checkpoint=True)


def resume_with_another_batch_size(c):
    out = copy_of_trained(c)
    shutil.rmtree(out / "final")
    demo(c, resume_from_checkpoint=True, batch_size=2)


def resume_single_device_checkpoint_on_two_ranks(c):
    # What hmt_finetune_distributed checks (it needs torchrun to run whole).
    state = ckpt.load_recipe_state(c.trained / "step_0000006")
    model = SimpleNamespace(to_dict=lambda: state["settings"]["hmt"])
    current = ckpt.resume_settings(demo_config(c.out), model, world_size=2)
    ckpt.check_resume(state, current, c.trained / "step_0000006")


def nproc_larger_than_the_data_can_split(c):
    # What both recipes call with their world size: 16 windows, batch_size=4 on 8 ranks.
    documents = synthetic_recall_dataset(
        None, num_documents=16, tokens_per_segment=18, distance_segments=2, vocab_size=32
    )
    build_dataloader(
        documents,
        hmt_config=hmt_tiny(**DEMO_MODEL).config,
        cfg_windows=None,
        collate_fn="hmt_plugin.data.segment_collate",
        batch_size=4,
        shuffle=True,
        seed=0,
        pad_id=0,
        world_size=8,
        rank=0,
    )


DEMO_MODEL = dict(
    DEMO_BACKBONE,
    max_seq_len=64,
    segment_length=24,
    num_sensory=4,
    recall_hidden_dim=32,
    cache_size=8,
    bptt_depth=3,
)


# ----------------------------------------------------------------------------- model inputs
@pytest.fixture(scope="module")
def model():
    m = hmt_tiny(**DEMO_MODEL)
    m.eval()
    return m


def ids(batch=2, length=40):
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(0))


@dataclass
class Case:
    name: str
    run: Callable[[Any], None]
    error: type
    culprit: str  # regex: the key, file, setting or value at fault
    fix: str  # regex: what to do about it


CASES = [
    # -- config keys (run_config.validate_finetune_config, first thing in both recipes)
    Case(
        "misspelled model builder argument",
        lambda c: demo(c, **{"model.bptt_dept": 2}),
        ConfigError,
        r"model\.'bptt_dept' is not an argument of hmt_plugin\.models\.hmt_tiny",
        r"Did you mean 'bptt_depth'\?",
    ),
    Case(
        "misspelled nested backbone argument",
        lambda c: lora(c, **{"model.backbone.lora_rnak": 4}),
        ConfigError,
        r"model\.backbone\.'lora_rnak' is not an argument of .*lora_llama2",
        r"Did you mean 'lora_rank'\?",
    ),
    Case(
        "misspelled dataset argument",
        lambda c: demo(c, **{"dataset.distance_segment": 2}),
        ConfigError,
        r"dataset\.'distance_segment' is not an argument",
        r"Did you mean 'distance_segments'\?",
    ),
    Case(
        "misspelled windows key",
        lambda c: demo(c, **{"windows.segments_per_windw": 3}),
        ConfigError,
        r"unknown config key windows\.'segments_per_windw'",
        r"Did you mean 'segments_per_window'\?",
    ),
    Case(
        "misspelled top-level key",
        lambda c: demo(c, save_every_n_step=2),
        ConfigError,
        r"unknown config key 'save_every_n_step'",
        r"Did you mean 'save_every_n_steps'\?",
    ),
    Case(
        "misspelled validation key",
        lambda c: demo(
            c,
            validation={
                "dataset": {"_component_": "hmt_plugin.data.synthetic_recall_dataset"},
                "mode": ["hmt"],
            },
        ),
        ConfigError,
        r"unknown config key validation\.'mode'",
        r"Did you mean 'modes'\?",
    ),
    Case(
        "misspelled component path",
        lambda c: demo(c, **{"dataset._component_": "hmt_plugin.data.synthetic_recal_dataset"}),
        ConfigError,
        r"dataset\._component_='hmt_plugin\.data\.synthetic_recal_dataset' cannot be imported",
        r"Did you mean 'hmt_plugin\.data\.synthetic_recall_dataset'\?",
    ),
    Case(
        "bad loss_scope",
        lambda c: demo(c, loss_scope="first"),
        ConfigError,
        r"loss_scope='first'",
        r"use 'last' \(the published loss\) or 'all'",
    ),
    Case(
        "learning rate that is not a number",
        lambda c: demo(c, **{"optimizer.lr": "fast"}),
        ConfigError,
        r"optimizer\.lr='fast'",
        r"must be a number, e\.g\. 3\.0e-4",
    ),
    Case(
        "log_every_n_steps=0",
        lambda c: demo(c, log_every_n_steps=0),
        ConfigError,
        r"log_every_n_steps=0",
        r"must be an integer >= 1, or null",
    ),
    Case(
        "distributed_timeout_s=0",
        lambda c: demo(c, distributed_timeout_s=0),
        ConfigError,
        r"distributed_timeout_s=0",
        r"must be a number of seconds > 0",
    ),
    # -- HMT settings (HMTConfig, when the recipe builds the model)
    Case(
        "segment too short for memory + sensory tokens",
        lambda c: demo(c, **{"model.segment_length": 6}),
        HMTConfigError,
        r"segment_length=6 leaves no room for new tokens.*memory \(2\) and sensory \(4\)",
        r"Increase segment_length or lower num_sensory",
    ),
    Case(
        "k >= new tokens per segment",
        lambda c: demo(c, **{"model.num_sensory": 18}),
        HMTConfigError,
        r"num_sensory=18 must be smaller than the 4 new tokens per segment",
        r"Lower num_sensory or increase segment_length",
    ),
    Case(
        "bptt_depth < 1",
        lambda c: demo(c, **{"model.bptt_depth": 0}),
        HMTConfigError,
        r"bptt_depth=0",
        r"must be an integer >= 1",
    ),
    Case(
        "N (cache_size) < 1",
        lambda c: demo(c, **{"model.cache_size": 0}),
        HMTConfigError,
        r"cache_size=0",
        r"must be an integer >= 1",
    ),
    Case(
        "d_h (recall_hidden_dim) < 1",
        lambda c: demo(c, **{"model.recall_hidden_dim": 0}),
        HMTConfigError,
        r"recall_hidden_dim=0",
        r"must be a positive integer \(or null",
    ),
    Case(
        "unknown mode",
        lambda c: demo(c, **{"model.mode": "hmt_v2"}),
        HMTConfigError,
        r"mode='hmt_v2' is not an HMT mode",
        r"use one of baseline, rmt, hmt_stage1, hmt",
    ),
    Case(
        "segment longer than the backbone's context",
        lambda c: demo(c, **{"model.segment_length": 128}),
        HMTConfigError,
        r"segment_length=128 is longer than the backbone's max_seq_len=64",
        r"lower segment_length or build the backbone with a larger max_seq_len",
    ),
    # -- checkpoints
    Case(
        "backbone checkpoint of another size",
        lambda c: demo(c, **{"checkpointer.embed_dim": 32}),
        KeyError,
        r"'backbone\.[\w.]+' has shape \(\d+, 32\) in the checkpoint but \(\d+, 64\)",
        r"Set the dimensions in `model` to the checkpoint's",
    ),
    Case(
        "backbone checkpoint with more layers",
        lambda c: demo(c, **{"checkpointer.num_layers": 3}),
        KeyError,
        r"unexpected \['backbone\.layers\.2\.",
        r"Check that `model` and `checkpointer` describe the same architecture and size",
    ),
    Case(
        "backbone checkpoint of another architecture",
        backbone_of_another_architecture,
        ValueError,
        r'unexpected key: "model\.layers\.0\.self_attn\.q_proj\.bias"',
        r"set checkpointer\.model_type \(and `model`\) to the architecture",
    ),
    Case(
        "truncated backbone safetensors",
        truncated_backbone,
        ValueError,
        r"Unable to load checkpoint from \S+/backbone/model\.safetensors",
        r"truncated or damaged.*download it again",
    ),
    Case(
        "missing backbone file",
        lambda c: lora(
            c, **{"checkpointer.checkpoint_files": ["model-00001-of-00002.safetensors"]}
        ),
        FileNotFoundError,
        r"No file with name: model-00001-of-00002\.safetensors",
        r"list its files in checkpointer\.checkpoint_files",
    ),
    Case(
        "HMT checkpoint of another recall_hidden_dim",
        lambda c: demo(
            c, hmt_checkpoint=str(c.trained / "final"), **{"model.recall_hidden_dim": 16}
        ),
        HMTCheckpointError,
        r"'recall\.[qk]_proj\.weight' has shape \(32, 64\), the model expects \(16, 64\)",
        r"another backbone size or recall_hidden_dim",
    ),
    Case(
        "HMT checkpoint of another mode",
        lambda c: demo(c, hmt_checkpoint=str(c.trained / "final"), **{"model.mode": "baseline"}),
        HMTCheckpointError,
        r"has 'initial_memory', which this 'baseline' model does not have",
        r"build the model in the mode the checkpoint was trained in",
    ),
    Case(
        "truncated hmt_model.safetensors",
        truncated_hmt_checkpoint,
        HMTCheckpointError,
        r"stage1_final/hmt_model\.safetensors cannot be read",
        r"truncated or damaged\. Use the previous checkpoint",
    ),
    Case(
        "hmt_checkpoint without HMT files",
        lambda c: demo(c, hmt_checkpoint=str(c.assets["backbone"])),
        FileNotFoundError,
        r"hmt_checkpoint='\S+/backbone' holds no hmt_model\.safetensors",
        r"Point it at a checkpoint directory of an earlier run.*or set hmt_checkpoint=null",
    ),
    Case(
        "stage-2 config pointed at a missing stage-1 checkpoint",
        stage2_without_stage1,
        FileNotFoundError,
        r"checkpoint_dir='\S+/stage1_never_run/final'",
        r"this stage-2 config reads the stage-1 run's `final` checkpoint\. Run stage 1 first",
    ),
    # -- resuming
    Case(
        "resume with no checkpoint",
        lambda c: demo(c, resume_from_checkpoint=True),
        FileNotFoundError,
        r"resume_from_checkpoint=True but \S+ holds no complete step checkpoint",
        r"run without it to start fresh",
    ),
    Case(
        "corrupt recipe_state.pt",
        corrupt_recipe_state,
        RuntimeError,
        r"step_0000006/recipe_state\.pt cannot be read",
        r"Delete \S+step_0000006 \(or its CHECKPOINT_COMPLETE file\) and resume again",
    ),
    Case(
        "resume a 2-rank checkpoint on one device",
        resume_with_another_world_size,
        ValueError,
        r"step_0000006 was written by a run on 2 process\(es\) and this run has 1",
        r"--nproc_per_node 2 hmt_finetune_distributed",
    ),
    Case(
        "resume a single-device checkpoint on 2 ranks",
        resume_single_device_checkpoint_on_two_ranks,
        ValueError,
        r"written by a run on 1 process\(es\) and this run has 2",
        r"Resume it with hmt_finetune_single_device",
    ),
    Case(
        "resume with another batch_size",
        resume_with_another_batch_size,
        ValueError,
        r"batch_size=2 but \S+step_0000006 was trained with batch_size=4",
        r"Restore batch_size to resume that run, or start a new run",
    ),
    # -- data
    Case(
        "missing tokenizer file",
        lambda c: lora(c, **{"tokenizer.path": str(c.tmp / "nope" / "tokenizer.model")}),
        FileNotFoundError,
        r"tokenizer\.path='\S+/nope/tokenizer\.model' does not exist",
        r"Point it at the model's tokenizer file",
    ),
    Case(
        "empty dataset folder",
        empty_dataset_folder,
        DataSourceError,
        r"\S+/empty holds no \.txt, \.jsonl or \.parquet files",
        r"Point source= at a directory of such files",
    ),
    Case(
        "folder of empty documents",
        only_empty_documents,
        ValueError,
        r"no non-empty documents in \S+/blank \(3 empty ones were skipped\)",
        r"check the path, split and column",
    ),
    Case(
        "binary file in a text folder",
        binary_file_in_text_folder,
        DataSourceError,
        r"scan\.txt looks binary",
        r"Remove it from the folder",
    ),
    Case(
        "token ids beyond the vocabulary",
        lambda c: demo(c, **{"dataset.vocab_size": 64, "dataset.num_symbols": 40}),
        ValueError,
        r"tokens hold ids outside the backbone's vocabulary \[0, 32\)",
        r"check that the tokenizer matches the model \(vocab_size\)",
    ),
    Case(
        "dataset laid out for another segment size",
        lambda c: demo(c, **{"dataset.tokens_per_segment": 17}),
        ValueError,
        r"dataset\.tokens_per_segment=17 but the model reads 18 new tokens per segment",
        r"set dataset\.tokens_per_segment=18",
    ),
    Case(
        "batch larger than the data",
        lambda c: demo(c, batch_size=1000),
        ValueError,
        r"96 training windows cannot fill one batch of 1000",
        r"lower batch_size or nproc_per_node, or add data",
    ),
    Case(
        "nproc_per_node larger than the batch can split",
        nproc_larger_than_the_data_can_split,
        ValueError,
        r"16 training windows cannot fill one batch of 4 on each of 8 rank\(s\)",
        r"lower batch_size or nproc_per_node",
    ),
    Case(
        "gradient_accumulation_steps beyond an epoch",
        lambda c: demo(c, gradient_accumulation_steps=100),
        ValueError,
        r"one epoch has 24 batches \(per rank\), fewer than gradient_accumulation_steps=100",
        r"add data or lower it",
    ),
]

MODEL_CASES = [
    # -- direct calls of the model (generation, evaluation and user code)
    Case(
        "mask with holes",
        lambda m: m(ids(), mask=torch.tensor([[True] * 5 + [False] + [True] * 34] * 2)),
        ValueError,
        r"mask must be True on a prefix of each row",
        r"\(right padding\)",
    ),
    Case(
        "labels of another shape",
        lambda m: m(ids(), labels=ids()[:, :-1]),
        ValueError,
        r"labels shape \(2, 39\) differs from tokens \(2, 40\)",
        r"give one label per token, unshifted",
    ),
    Case(
        "labels with -1 as the ignore index",
        lambda m: m(ids(), labels=ids().masked_fill(ids() < 8, -1)),
        ValueError,
        r"labels hold -1, outside the backbone's vocabulary \[0, 32\)",
        r"mark positions without a target with -100",
    ),
    Case(
        "token ids beyond the vocabulary (model call)",
        lambda m: m(ids() + 30),
        ValueError,
        r"tokens hold ids outside the backbone's vocabulary \[0, 32\)",
        r"check that the tokenizer matches the model",
    ),
    Case(
        "float tokens",
        lambda m: m(ids().float()),
        ValueError,
        r"got dtype torch\.float32",
        r"integer token ids \(torch\.long\)",
    ),
    Case(
        "seq_lens beyond the tokens",
        lambda m: m(ids(), seq_lens=[41, 3]),
        ValueError,
        r"seq_lens=\[41, 3\]",
        r"one length in \[0, 40\] per row",
    ),
    Case(
        "state of another batch",
        lambda m: m(ids(), state=m(ids(batch=1)).state),
        ValueError,
        r"state is for 1 rows but tokens have 2",
        r"pass the state of a call on the same batch",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_recipe_input_is_refused_naming_culprit_and_fix(case, ctx):
    with pytest.raises(case.error) as info:
        case.run(ctx)
    message = str(info.value)
    assert re.search(case.culprit, message, re.S), f"culprit not named: {message}"
    assert re.search(case.fix, message, re.S), f"fix not named: {message}"


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_model_input_is_refused_naming_culprit_and_fix(case, model):
    with pytest.raises(case.error) as info:
        case.run(model)
    message = str(info.value)
    assert re.search(case.culprit, message, re.S), f"culprit not named: {message}"
    assert re.search(case.fix, message, re.S), f"fix not named: {message}"


def test_catalogue_is_in_the_readme():
    """tests/README.md lists every case here by name."""
    readme = (Path(__file__).parent / "README.md").read_text()
    missing = [c.name for c in CASES + MODEL_CASES if c.name not in readme]
    assert not missing, missing


def test_file_of_nul_bytes_is_refused(tmp_path, assets):
    from hmt_plugin.data import long_text_dataset
    from torchtune.models.llama2 import llama2_tokenizer

    folder = tmp_path / "books"
    shutil.copytree(assets["books"], folder)
    (folder / "disk_image.txt").write_bytes(b"\0" * 4096)
    with pytest.raises(DataSourceError, match=r"disk_image\.txt"):
        long_text_dataset(
            llama2_tokenizer(str(assets["tokenizer"])),
            folder,
            cache_dir=tmp_path / "cache",
            progress=False,
        )
