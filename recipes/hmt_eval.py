"""Evaluate HMT models on long documents, and on lm-eval harness tasks.

    hmt-tune run hmt_eval --config tiny/hmt_eval_cpu
    hmt-tune run hmt_eval --config llama2_7b/hmt_eval_pg19

What it measures, for every run (a checkpoint read in one mode):

* the HMT paper's long-context metric: the perplexity of the last segment after a context of
  T tokens, for each T in ``context_lengths`` (documents shorter than T are skipped and
  counted);
* whole-document token-level perplexity (``document_ppl``);
* peak memory while reading up to each T (it stays flat: documents are read in calls of
  ``chunk_segments`` segments with the recurrent state carried between them);
* for ``hmt`` runs, how many segments back each segment's strongest recall looks (the paper's
  Figure 11);
* optionally, the published code's test PPL (``published_test_ppl`` section: windows of
  ``test_length`` + L tokens sliding by L, the last L tokens scored, the mean over batches of
  ``exp(batch loss)``), beside ours;
* optionally, lm-eval harness tasks (``lm_eval`` section).

A mode other than the checkpoint's own reads as many new tokens per segment as the model's
configured mode (``keep_tokens_per_segment: true``, the default), so runs compared on the same
documents score the same tokens and only memory differs.

Runs are either one checkpoint in several ``modes`` (the same weights with memory or recall
switched off) or a ``runs`` list of checkpoints each with its own mode; both read the same
documents. Results go to ``<output_dir>/eval_results.json``, the metric logger (TensorBoard:
``ppl_last_segment/<run>`` and ``peak_memory_mb/<run>`` against T), PNG plots
(``ppl_vs_context.png``, ``recall_distance_hist.png``) and a table on stdout.
"""

import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from hmt_plugin.eval.long_context import (
    LongContextResult,
    check_context_lengths,
    evaluate_long_context,
    evaluate_published_test_ppl,
    format_long_context_table,
    format_published_test_table,
)
from hmt_plugin.eval.memory import PROBES, memory_probe
from hmt_plugin.eval.model_loading import MODEL_READING_KEYS, describe, load_hmt_model
from hmt_plugin.eval.quantization import quantize_from_config
from hmt_plugin.eval.plots import plot_ppl_vs_context, plot_recall_distance
from hmt_plugin.modules.hmt_config import MODES, HMTConfigError
from hmt_plugin.training.data_setup import build_documents
from hmt_plugin.training.recipe_main import run_recipe
from hmt_plugin.training.run_config import ConfigError, check_component_args, check_keys

log = utils.get_logger("INFO")

EVAL_KEYS = {
    *MODEL_READING_KEYS,
    "modes",
    "runs",
    "dataset",
    "context_lengths",
    "max_tokens",
    "document_ppl",
    "batch_size",
    "chunk_segments",
    "memory_probe",
    "plots",
    "metric_logger",
    "lm_eval",
    "quantization",
    "keep_tokens_per_segment",
    "published_test_ppl",
}
RUN_KEYS = {"name", "mode", "model", "checkpointer", "hmt_checkpoint"}
PUBLISHED_TEST_KEYS = {"test_lengths", "batch_size", "test_step"}
LM_EVAL_KEYS = {
    "tasks",
    "include_path",
    "include_defaults",
    "limit",
    "num_fewshot",
    "metadata",
    "max_gen_toks",
    "bootstrap_iters",
    "refresh_recall",
}


@dataclass
class EvalRun:
    """One checkpoint read in one mode."""

    label: str
    mode: str
    model: DictConfig
    checkpointer: DictConfig
    hmt_checkpoint: Optional[str]
    where: str

    def weights(self) -> str:
        """Runs with equal weights share one loaded model."""
        return OmegaConf.to_yaml(
            OmegaConf.create({"m": self.model, "c": self.checkpointer, "h": self.hmt_checkpoint})
        )


def plan_runs(cfg: DictConfig) -> List[EvalRun]:
    """The runs of a config: its ``runs`` list, or the top-level checkpoint in each of
    ``modes``. Raises :class:`ConfigError` naming the bad field."""
    default_mode = cfg.model.get("mode", "hmt") if cfg.get("model") is not None else "hmt"
    runs: List[EvalRun] = []
    if cfg.get("runs"):
        if cfg.get("modes"):
            raise ConfigError(
                "give either `modes` (one checkpoint, several modes) or `runs`, not both."
            )
        for i, node in enumerate(cfg.runs):
            where = f"runs[{i}]."
            check_keys(node, RUN_KEYS, where)
            mode = node.get("mode") or default_mode
            runs.append(
                EvalRun(
                    label=str(node.get("name") or mode),
                    mode=mode,
                    model=node.get("model") or cfg.get("model"),
                    checkpointer=node.get("checkpointer") or cfg.get("checkpointer"),
                    hmt_checkpoint=(
                        node["hmt_checkpoint"]
                        if "hmt_checkpoint" in node
                        else cfg.get("hmt_checkpoint")
                    ),
                    where=where,
                )
            )
    else:
        modes = list(cfg.get("modes") or [default_mode])
        for mode in modes:
            runs.append(
                EvalRun(
                    mode,
                    mode,
                    cfg.get("model"),
                    cfg.get("checkpointer"),
                    cfg.get("hmt_checkpoint"),
                    "",
                )
            )
    for run in runs:
        if run.mode not in MODES:
            field = f"{run.where}mode" if run.where else "modes"
            raise ConfigError(
                f"{field}: {run.mode!r} is not an HMT mode; use one of {', '.join(MODES)}."
            )
        if run.model is None or run.checkpointer is None:
            raise ConfigError(
                f"{run.where or ''}model and checkpointer are required (top level or per run)."
            )
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"run names {labels} repeat; give each run a distinct `name`.")
    return runs


def validate_eval_config(cfg: DictConfig) -> None:
    check_keys(cfg, EVAL_KEYS, "")
    for key in ("output_dir", "device", "dtype", "seed", "metric_logger"):
        if cfg.get(key) is None:
            raise ConfigError(
                f"the config lacks `{key}`; copy one with `hmt-tune cp tiny/hmt_eval_cpu`."
            )
    scoring = bool(cfg.get("context_lengths")) or cfg.get("document_ppl", True)
    if scoring:
        if cfg.get("dataset") is None:
            raise ConfigError(
                "the config has no `dataset` to score; add one, or set context_lengths: null and "
                "document_ppl: false to run lm_eval tasks only."
            )
        if cfg.get("context_lengths"):
            try:
                check_context_lengths(list(cfg.context_lengths))
            except ValueError as err:
                raise ConfigError(str(err)) from err
    elif cfg.get("lm_eval") is None and cfg.get("published_test_ppl") is None:
        raise ConfigError(
            "nothing to evaluate: set context_lengths, document_ppl, published_test_ppl or lm_eval."
        )
    published = cfg.get("published_test_ppl")
    if published is not None:
        check_keys(published, PUBLISHED_TEST_KEYS, "published_test_ppl.")
        if cfg.get("dataset") is None:
            raise ConfigError("published_test_ppl needs a `dataset` (its test documents).")
        lengths = published.get("test_lengths") or cfg.get("context_lengths")
        if not lengths:
            raise ConfigError(
                "published_test_ppl.test_lengths is empty and there are no context_lengths; give "
                "its --test_length values, e.g. test_lengths: [1998]."
            )
        try:
            check_context_lengths(list(lengths))
        except ValueError as err:
            raise ConfigError(f"published_test_ppl.test_lengths: {err}") from err
        for key in ("batch_size", "test_step"):
            value = published.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"published_test_ppl.{key}={value!r} must be an integer >= 1 (or null).")
    for key in ("batch_size", "chunk_segments"):
        value = cfg.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be an integer >= 1.")
    if cfg.get("memory_probe", "auto") not in PROBES:
        raise ConfigError(f"memory_probe={cfg.memory_probe!r}: use one of {', '.join(PROBES)}.")
    if cfg.get("lm_eval") is not None:
        check_keys(cfg.lm_eval, LM_EVAL_KEYS, "lm_eval.")
        if not cfg.lm_eval.get("tasks"):
            raise ConfigError(
                "lm_eval.tasks is empty; name at least one task (or set lm_eval: null)."
            )
        if cfg.get("tokenizer") is None:
            raise ConfigError("lm_eval tasks are text: the config needs a `tokenizer`.")
    for key in ("model", "tokenizer", "checkpointer", "dataset", "metric_logger"):
        if cfg.get(key) is not None:
            check_component_args(cfg[key], f"{key}.")
    plan_runs(cfg)


class HMTEvalRecipe:
    """Long-context evaluation of one or more HMT runs. See the module docstring and
    ``configs/tiny/hmt_eval_cpu.yaml``."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_eval_config(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._seed = training.set_seed(seed=cfg.seed)
        self._output_dir = Path(cfg.output_dir)
        self._cfg = cfg
        self._quantized: Dict[str, Any] = {"scheme": None}

    def setup(self, cfg: DictConfig) -> None:
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)
        self._tokenizer = config.instantiate(cfg.tokenizer) if cfg.get("tokenizer") else None
        self._runs = plan_runs(cfg)
        self._context_lengths = list(cfg.get("context_lengths") or [])
        self._document_ppl = bool(cfg.get("document_ppl", True))
        self._documents = None
        self._keep = bool(cfg.get("keep_tokens_per_segment", True))
        self._published = cfg.get("published_test_ppl")
        if self._context_lengths or self._document_ppl or self._published is not None:
            self._documents = build_documents(cfg.dataset, self._tokenizer)
            self._check_documents(cfg)
            log.info(f"{len(self._documents)} documents to score")
        self._probe = memory_probe(cfg.get("memory_probe", "auto"), self._device)

    def _check_documents(self, cfg: DictConfig) -> None:
        """Before any model is loaded: every T must fit some document."""
        lengths = (
            self._documents.lengths
            if hasattr(self._documents, "lengths")
            else [len(d["tokens"]) for d in self._documents]
        )
        longest = int(max(lengths)) if len(lengths) else 0
        max_tokens = cfg.get("max_tokens")
        if max_tokens is not None:
            longest = min(longest, max_tokens)
        beyond = [t for t in self._context_lengths if t > longest]
        if beyond:
            raise ConfigError(
                f"context_lengths {beyond} exceed the longest document ({longest} tokens"
                f"{', max_tokens=' + str(max_tokens) if max_tokens is not None else ''}); lower "
                "them, raise max_tokens, or use a dataset with longer documents."
            )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, Any]:
        cfg = self._cfg
        results: List[LongContextResult] = []
        lm_eval_results: Dict[str, Any] = {}
        model, loaded = None, None
        for run in self._runs:
            if run.weights() != loaded:
                model = None
                gc.collect()
                model = load_hmt_model(
                    run.model,
                    run.checkpointer,
                    run.hmt_checkpoint,
                    device=self._device,
                    dtype=self._dtype,
                    seed=self._seed,
                    where=run.where,
                )
                self._quantized = quantize_from_config(model, cfg.get("quantization"))
                loaded = run.weights()
            self._check_mode(model, run)
            log.info(f"[{run.label}] {describe(model, run.mode, keep_tokens_per_segment=self._keep)}")
            if self._documents is not None and (self._context_lengths or self._document_ppl):
                t0 = time.perf_counter()
                result = evaluate_long_context(
                    model,
                    self._documents,
                    context_lengths=self._context_lengths,
                    mode=run.mode,
                    label=run.label,
                    batch_size=cfg.get("batch_size", 1),
                    chunk_segments=cfg.get("chunk_segments", 16),
                    max_tokens=cfg.get("max_tokens"),
                    document_ppl=self._document_ppl,
                    memory=self._probe,
                    progress=True,
                    keep_tokens_per_segment=self._keep,
                )
                log.info(
                    f"[{run.label}] read {result.tokens_read:,} tokens in "
                    f"{time.perf_counter() - t0:.1f}s"
                )
                self._log_result(result)
                results.append(result)
            if self._published is not None:
                published = self._published_test(model, run)
                if results and results[-1].label == run.label:
                    results[-1].published_test = published
                else:
                    results.append(LongContextResult(
                        label=run.label, mode=run.mode,
                        tokens_per_segment=published[0].tokens_per_segment, published_test=published,
                    ))
            if cfg.get("lm_eval") is not None:
                lm_eval_results[run.label] = self._run_lm_eval(model, run)
        return self._report(results, lm_eval_results)

    def _published_test(self, model, run: EvalRun):
        section = self._published
        t0 = time.perf_counter()
        scores = evaluate_published_test_ppl(
            model,
            self._documents,
            test_lengths=list(section.get("test_lengths") or self._context_lengths),
            batch_size=section.get("batch_size") or 1,
            test_step=section.get("test_step"),
            mode=run.mode,
            chunk_segments=self._cfg.get("chunk_segments", 16),
            max_tokens=self._cfg.get("max_tokens"),
            keep_tokens_per_segment=self._keep,
        )
        for s in scores:
            self._metric_logger.log_dict({f"ppl_published_test/{run.label}": s.ppl}, step=s.test_length)
        log.info(f"[{run.label}] published test PPL in {time.perf_counter() - t0:.1f}s")
        return scores

    def _check_mode(self, model, run: EvalRun) -> None:
        try:
            original = model.config
            model.set_mode(run.mode, keep_tokens_per_segment=self._keep)
            model.config = original
        except HMTConfigError as err:
            field = f"{run.where}mode" if run.where else "modes"
            raise ConfigError(
                f"{field}: cannot read this checkpoint in mode {run.mode!r}: {err}"
            ) from err

    def _log_result(self, result: LongContextResult) -> None:
        for s in result.context:
            if s.tokens:
                scalars = {f"ppl_last_segment/{result.label}": s.ppl}
                if s.peak_memory_mb is not None:
                    scalars[f"peak_memory_mb/{result.label}"] = s.peak_memory_mb
                self._metric_logger.log_dict(scalars, step=s.context_length)
        if result.document is not None:
            self._metric_logger.log_dict(
                {f"ppl_document/{result.label}": result.document.ppl}, step=0
            )

    def _run_lm_eval(self, model, run: EvalRun) -> Dict[str, Any]:
        try:
            from hmt_plugin.eval.lm_eval_harness import HMTEvalWrapper, run_lm_eval
        except ImportError as err:
            raise ConfigError(
                f"the lm_eval section needs lm-eval ({err}); install it with "
                "`pip install 'hmt-torchtune[lm_eval]'` (lm_eval==0.4.13)."
            ) from err
        section = OmegaConf.to_container(self._cfg.lm_eval, resolve=True)
        wrapper = HMTEvalWrapper(
            model,
            self._tokenizer,
            mode=run.mode,
            max_gen_toks=section.get("max_gen_toks", 256),
            chunk_segments=self._cfg.get("chunk_segments", 16),
            refresh_recall=section.get("refresh_recall", True),
            seed=self._seed,
        )
        out = run_lm_eval(
            wrapper,
            tasks=list(section["tasks"]),
            include_path=section.get("include_path"),
            include_defaults=section.get("include_defaults", True),
            limit=section.get("limit"),
            num_fewshot=section.get("num_fewshot"),
            metadata=section.get("metadata"),
            bootstrap_iters=section.get("bootstrap_iters", 0),
            random_seed=self._seed,
        )
        scores = {task: _numbers(metrics) for task, metrics in out.get("results", {}).items()}
        for task, metrics in scores.items():
            self._metric_logger.log_dict(
                {f"lm_eval/{run.label}/{task}/{name}": value for name, value in metrics.items()},
                step=0,
            )
        try:
            from lm_eval.utils import make_table

            print(f"\nlm-eval, {run.label}:\n{make_table(out)}")
        except Exception:  # the table is a nicety; the numbers are in the JSON
            pass
        return scores

    # ------------------------------------------------------------------ report
    def _report(
        self, results: List[LongContextResult], lm_eval_results: Dict[str, Any]
    ) -> Dict[str, Any]:
        cfg = self._cfg
        plots = {}
        if results and cfg.get("plots", True):
            for name, fn in (
                ("ppl_vs_context", plot_ppl_vs_context),
                ("recall_distance_hist", plot_recall_distance),
            ):
                path = fn(results, self._output_dir / f"{name}.png")
                if path is not None:
                    plots[name] = str(path)
        report = {
            "context_lengths": self._context_lengths,
            "max_tokens": cfg.get("max_tokens"),
            "documents": None if self._documents is None else len(self._documents),
            "memory_probe": {"name": self._probe.name, "description": self._probe.description},
            "quantization": self._quantized,
            "runs": {},
            "plots": plots,
        }
        for r in results:
            report["runs"][r.label] = r.to_dict()
        for label, scores in lm_eval_results.items():
            report["runs"].setdefault(label, {"label": label})["lm_eval"] = scores
        path = self._output_dir / "eval_results.json"
        path.write_text(json.dumps(report, indent=2, allow_nan=True))
        if any(r.context or r.document for r in results):
            print("\n" + format_long_context_table(results) + "\n")
        if any(r.published_test for r in results):
            print("\n" + format_published_test_table(results) + "\n")
        print(f"Results: {path}" + (f"; plots: {', '.join(plots.values())}" if plots else ""))
        return report

    def cleanup(self) -> None:
        self._metric_logger.close()


def _numbers(metrics: Dict[str, Any]) -> Dict[str, float]:
    """lm-eval's per-task dict without its non-numeric entries (alias, 'N/A' stderr)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(HMTEvalRecipe, cfg, "evaluate")


if __name__ == "__main__":
    sys.exit(recipe_main())
