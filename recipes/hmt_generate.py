"""Generate text with an HMT model, streaming it to stdout.

    hmt-tune run hmt_generate --config tiny/hmt_generate_cpu
    hmt-tune run hmt_generate --config tiny/hmt_generate_cpu prompt="Once upon a time" temperature=0

A prompt of any length is read segment by segment; decoding uses a KV cache inside the
current segment and writes the segment's memory when it fills, so outputs can be longer
than a segment (see :mod:`hmt_plugin.generation.generator` for the memory policy). Greedy,
temperature and top-k sampling. The text, token ids and timings also go to
``<output_dir>/generation.json``.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from hmt_plugin.eval.model_loading import MODEL_READING_KEYS, describe, load_hmt_model
from hmt_plugin.eval.quantization import quantize_from_config
from hmt_plugin.generation import HMTGenerator
from hmt_plugin.modules.hmt_config import MODES, HMTConfigError
from hmt_plugin.training.recipe_main import run_recipe
from hmt_plugin.training.run_config import ConfigError, check_component_args, check_keys

log = utils.get_logger("INFO")

GENERATE_KEYS = {
    *MODEL_READING_KEYS,
    "mode",
    "prompt",
    "prompt_file",
    "add_bos",
    "max_new_tokens",
    "temperature",
    "top_k",
    "stop_at_eos",
    "refresh_recall",
    "prefill_chunk_segments",
    "quantization",
}


def validate_generate_config(cfg: DictConfig) -> None:
    check_keys(cfg, GENERATE_KEYS, "")
    for key in ("output_dir", "device", "dtype", "seed", "model", "checkpointer", "tokenizer"):
        if cfg.get(key) is None:
            raise ConfigError(
                f"the config lacks `{key}`; copy one with `hmt-tune cp tiny/hmt_generate_cpu`."
            )
    if cfg.get("prompt_file") is None and not cfg.get("prompt"):
        raise ConfigError(
            "prompt is empty: set `prompt` to some text or `prompt_file` to a text file."
        )
    if cfg.get("prompt_file") is not None and not Path(cfg.prompt_file).is_file():
        raise ConfigError(f"prompt_file={cfg.prompt_file!r} does not exist.")
    mode = cfg.get("mode")
    if mode is not None and mode not in MODES:
        raise ConfigError(
            f"mode={mode!r} is not an HMT mode; use one of {', '.join(MODES)} (or null)."
        )
    n = cfg.get("max_new_tokens")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_new_tokens={n!r} must be an integer >= 1.")
    temperature = cfg.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"temperature={temperature!r} must be >= 0 (0 is greedy).")
    top_k = cfg.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} must be a positive integer or null.")
    for key in ("model", "tokenizer", "checkpointer"):
        check_component_args(cfg[key], f"{key}.")


class TextStream:
    """Prints generated text as tokens arrive. SentencePiece-style tokenizers only give the
    right spacing and multi-byte characters when a sequence is decoded whole, so each step
    decodes the output (after a few prompt tokens as context) and prints what is new; text
    ending in an unfinished character waits for the next token."""

    def __init__(self, tokenizer: Any, prompt: List[int], out=None) -> None:
        self.tokenizer = tokenizer
        self.context = list(prompt[-4:])
        self.context_text = tokenizer.decode(self.context)
        self.tokens: List[int] = []
        self.shown = ""
        self.out = out or sys.stdout

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.context + self.tokens)
        if text.startswith(self.context_text):
            text = text[len(self.context_text) :]
        else:  # the context re-tokenized differently: fall back to the output alone
            text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text


class HMTGenerateRecipe:
    """Reads a prompt and generates with an HMT model.

    See ``configs/tiny/hmt_generate_cpu.yaml`` for every option."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_generate_config(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._seed = training.set_seed(seed=cfg.seed)
        self._cfg = cfg

    def setup(self, cfg: DictConfig) -> None:
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._model = load_hmt_model(
            cfg.model,
            cfg.checkpointer,
            cfg.get("hmt_checkpoint"),
            device=self._device,
            dtype=self._dtype,
            seed=self._seed,
        )
        quantize_from_config(self._model, cfg.get("quantization"))
        if cfg.get("mode") is not None:
            try:
                self._model.set_mode(cfg.mode)
            except HMTConfigError as err:
                raise ConfigError(f"mode={cfg.mode!r}: {err}") from err
        log.info(describe(self._model))
        self._generator = HMTGenerator(
            self._model,
            refresh_recall=cfg.get("refresh_recall", True),
            prefill_chunk_segments=cfg.get("prefill_chunk_segments", 16),
        )

    def _prompt_ids(self) -> List[int]:
        cfg = self._cfg
        text = (
            Path(cfg.prompt_file).read_text(encoding="utf-8")
            if cfg.get("prompt_file")
            else cfg.prompt
        )
        ids = list(self._tokenizer.encode(text, add_bos=cfg.get("add_bos", True), add_eos=False))
        if not ids:
            raise ConfigError("the prompt encodes to no tokens; give some text (or add_bos: true).")
        return ids

    @torch.no_grad()
    def generate(self) -> Dict[str, Any]:
        cfg = self._cfg
        prompt = self._prompt_ids()
        stops = list(getattr(self._tokenizer, "stop_tokens", None) or [self._tokenizer.eos_id])
        sampler = torch.Generator(device=self._device).manual_seed(self._seed)
        block = self._model.config.tokens_per_segment
        log.info(
            f"Prompt: {len(prompt)} tokens ({len(prompt) // block} complete segments of {block}); "
            f"generating up to {cfg.max_new_tokens} tokens"
        )
        t0 = time.perf_counter()
        self._generator.prefill(prompt)
        t_prompt = time.perf_counter() - t0
        stream = TextStream(self._tokenizer, prompt)
        shown = self._tokenizer.decode(prompt)
        print(shown if len(shown) <= 400 else "..." + shown[-400:], end="", flush=True)
        t1 = time.perf_counter()
        out = self._generator.generate(
            None,
            cfg.max_new_tokens,
            temperature=float(cfg.get("temperature", 0.0)),
            top_k=cfg.get("top_k"),
            stop_tokens=stops if cfg.get("stop_at_eos", True) else None,
            generator=sampler,
            callback=stream,
        )
        seconds = time.perf_counter() - t1
        print(flush=True)
        tokens = out.sequences()[0]
        state = self._generator.state
        report = {
            "prompt_tokens": len(prompt),
            "generated_tokens": len(tokens),
            "stopped_at_eos": out.stopped[0],
            "text": self._tokenizer.decode(tokens),
            "tokens": tokens,
            "segments_read": state.segments_seen[0],
            "mode": self._model.config.mode,
            "prompt_seconds": t_prompt,
            "generation_seconds": seconds,
            "tokens_per_second": out.tokens.shape[1] / seconds if seconds > 0 else None,
        }
        log.info(
            f"{len(tokens)} tokens in {seconds:.2f}s "
            f"({report['tokens_per_second'] or 0:.1f} tokens/s); "
            f"prompt read in {t_prompt:.2f}s; {report['segments_read']} segments read in all"
        )
        path = Path(cfg.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "generation.json").write_text(json.dumps(report, indent=2))
        return report

    def cleanup(self) -> None:
        pass


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(HMTGenerateRecipe, cfg, "generate")


if __name__ == "__main__":
    sys.exit(recipe_main())
