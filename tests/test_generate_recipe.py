"""The hmt_generate recipe on tiny assets: text streams to stdout past two segment
boundaries, the same tokens as the generator, sampling, and named config errors."""

import io
import json

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.models.llama2 import llama2_tokenizer

from hmt_plugin.cli import config_path
from hmt_plugin.eval.model_loading import load_hmt_model
from hmt_plugin.generation import HMTGenerator
from hmt_plugin.training.run_config import ConfigError
from tests.test_eval_recipe import eval_assets, model_node, tiny_checkpointer

PROMPT = "The quick brown fox jumps over the lazy dog, a journey of"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return eval_assets(tmp_path_factory.mktemp("gen_assets"))


def generate_config(assets, out, **overrides):
    cfg = OmegaConf.load(config_path("tiny/hmt_generate_cpu"))
    cfg.backbone_dir = str(assets["backbone"])
    cfg.run_dir = str(out / "unused")
    cfg.output_dir = str(out)
    cfg.model = model_node()
    cfg.checkpointer = tiny_checkpointer(assets, out)
    cfg.hmt_checkpoint = str(assets["hmt"])
    cfg.tokenizer.path = str(assets["tokenizer"])
    cfg.prompt = PROMPT
    cfg.max_new_tokens = 2 * 18 + 5  # crosses two segment boundaries (18 new tokens each)
    cfg.temperature = 0
    cfg.stop_at_eos = False
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def run_in_process(cfg):
    from hmt_plugin.recipes.hmt_generate import HMTGenerateRecipe

    recipe = HMTGenerateRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    report = recipe.generate()
    recipe.cleanup()
    return report


def test_generate_recipe_streams_text_past_segment_boundaries(assets, tmp_path, capsys):
    # In-process (the CLI path of the recipes is exercised by test_eval_recipe).
    out = tmp_path / "gen"
    run_in_process(generate_config(assets, out))
    stdout = capsys.readouterr().out
    report = json.loads((out / "generation.json").read_text())
    assert report["generated_tokens"] == 41 and report["mode"] == "hmt"
    assert report["segments_read"] >= 2
    # stdout: the prompt, then the output as it was produced
    assert stdout.startswith(PROMPT) and stdout.rstrip("\n").endswith(report["text"].rstrip())

    # The recipe's tokens are the generator's greedy tokens on the same weights.
    cfg = generate_config(assets, out)
    model = load_hmt_model(
        cfg.model,
        cfg.checkpointer,
        cfg.hmt_checkpoint,
        device=torch.device("cpu"),
        dtype=torch.float32,
        seed=0,
    )
    tokenizer = llama2_tokenizer(str(assets["tokenizer"]))
    prompt = tokenizer.encode(PROMPT, add_bos=True, add_eos=False)
    want = HMTGenerator(model).generate(prompt, 41).sequences()[0]
    assert report["tokens"] == want


def test_text_stream_prints_what_decoding_the_whole_output_gives(assets):
    from hmt_plugin.recipes.hmt_generate import TextStream

    tokenizer = llama2_tokenizer(str(assets["tokenizer"]))
    prompt = tokenizer.encode("It was the", add_bos=True, add_eos=False)
    output = tokenizer.encode(" best of times, it was the worst", add_bos=False, add_eos=False)
    sink = io.StringIO()
    stream = TextStream(tokenizer, prompt, out=sink)
    for t in output:
        stream(t)
    assert sink.getvalue() == " best of times, it was the worst"


def test_sampling_mode_and_prompt_file(assets, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(" ".join([PROMPT] * 4))
    report = run_in_process(
        generate_config(
            assets,
            tmp_path / "s",
            prompt_file=str(prompt_file),
            mode="rmt",
            temperature=0.9,
            top_k=20,
            max_new_tokens=25,
        )
    )
    assert report["mode"] == "rmt" and report["generated_tokens"] == 25
    assert report["prompt_tokens"] > 2 * 22


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"prompt": ""}, "prompt is empty"),
        (
            {"prompt_file": "/no/such/prompt.txt"},
            "prompt_file='/no/such/prompt.txt' does not exist",
        ),
        ({"mode": "memoryless"}, "mode='memoryless' is not an HMT mode"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"temperature": -1}, "temperature=-1"),
        ({"top_k": 0}, "top_k=0"),
        ({"max_new_token": 5}, "Did you mean 'max_new_tokens'"),
        ({"hmt_checkpoint": "/no/such/run"}, "hmt_checkpoint='/no/such/run' does not exist"),
    ],
)
def test_bad_configs_are_named(assets, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run_in_process(generate_config(assets, tmp_path / "bad", **overrides))
