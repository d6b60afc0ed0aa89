"""End-of-training validation: the trained weights read held-out documents in several modes
(e.g. without recall, without memory), so a run shows what its memory contributes."""

import json
from pathlib import Path
from typing import Any, List

from omegaconf import DictConfig
from hmt_plugin.eval.scoring import available_modes, format_table, score_mode
from hmt_plugin.training.data_setup import build_documents, pad_id_of

def run_validation(model, cfg: DictConfig, tokenizer: Any, metric_logger, device, output_dir, step: int) -> List[dict]:
    """Score ``cfg.dataset`` in each of ``cfg.modes``; log the scores, write
    ``<output_dir>/validation.json`` and print a table. ``metric_logger=None`` scores without
    reporting (the other ranks of a sharded model)."""
    documents = build_documents(cfg.dataset, tokenizer)
    modes = available_modes(model, list(cfg.get("modes", [model.config.mode])))
    scores = [
        score_mode(
            model,
            documents,
            mode=mode,
            batch_size=cfg.get("batch_size", 8),
            max_tokens=cfg.get("max_tokens"),
            pad_id=pad_id_of(tokenizer),
            device=device,
        )
        for mode in modes
    ]
    if metric_logger is None:
        return [s.to_dict() for s in scores]
    for s in scores:
        metric_logger.log_dict(
            {f"val/{s.mode}/ppl": s.ppl, f"val/{s.mode}/accuracy": s.accuracy}, step=step
        )
    path = Path(output_dir) / "validation.json"
    path.write_text(json.dumps([s.to_dict() for s in scores], indent=2))
    table = format_table(scores)
    print(f"\nValidation on held-out documents (the trained weights, read in each mode):\n{table}\n")
    return [s.to_dict() for s in scores]
