"""Evaluation of HMT models: long-context perplexity (the paper's last-segment PPL after T
tokens, whole-document PPL), peak memory, recall distances, plots; mode scores for the
training recipes' validation. The lm-eval harness wrapper lives in
``hmt_plugin.eval.lm_eval_harness`` (it needs the optional ``lm_eval`` package)."""

from hmt_plugin.eval.long_context import (
    ContextLengthScore,
    DocumentScore,
    LongContextResult,
    evaluate_long_context,
    format_long_context_table,
)
from hmt_plugin.eval.memory import MemoryProbe, MemoryReading, memory_probe
from hmt_plugin.eval.model_loading import load_hmt_model
from hmt_plugin.eval.plots import plot_ppl_vs_context, plot_recall_distance
from hmt_plugin.eval.scoring import ModeScore, available_modes, format_table, score_mode

__all__ = [
    "ContextLengthScore",
    "DocumentScore",
    "LongContextResult",
    "MemoryProbe",
    "MemoryReading",
    "ModeScore",
    "available_modes",
    "evaluate_long_context",
    "format_long_context_table",
    "format_table",
    "load_hmt_model",
    "memory_probe",
    "plot_ppl_vs_context",
    "plot_recall_distance",
    "score_mode",
]
