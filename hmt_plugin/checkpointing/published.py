"""The published HMT code's formats (OswaldHe/HMT-pytorch): its hyperparameter names and
the keys of its ``RecurrentWrapper.state_dict()``, mapped to ours in one place."""

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from hmt_plugin.modules.hmt_config import HMTConfig

# Published argument name -> HMTConfig field.
PUBLISHED_HPARAMS: Dict[str, str] = {
    "segment_length": "segment_length",
    "memory_size": "num_memory_tokens",
    "num_sensory": "num_sensory",
    "sum_fraction": "sum_fraction",
    "mem_recall_hidden_dim": "recall_hidden_dim",
    "mem_recall_context": "cache_size",
    "bptt_depth": "bptt_depth",
}

# The published main.py's defaults for settings a run does not give (ours differ: its
# num_sensory defaults to 0, ours to 32, as in the paper).
PUBLISHED_DEFAULTS: Dict[str, Any] = {
    "segment_length": 256,
    "num_sensory": 0,
    "mem_recall_context": 100,
    "bptt_depth": 2,
    "memory_size": 1,
}

# Published state-dict key -> our parameter name (the backbone lives under
# ``memory_cell.model.`` there and under ``backbone.`` here, in torchtune's key format).
PUBLISHED_KEYS: Dict[str, str] = {
    "memory_cell.memory": "initial_memory",
    "mem": "summary_token",
    "cross_attn.wq.weight": "recall.q_proj.weight",
    "cross_attn.wk.weight": "recall.k_proj.weight",
}
PUBLISHED_BACKBONE_PREFIX = "memory_cell.model."
# Present in published checkpoints but unused by its forward (an experimental "switch" mode).
PUBLISHED_UNUSED_PREFIXES = ("memory_cell.mem_map.",)


# ``mode`` as a reference case's case.json may spell it -> ours.
_MODE_NAMES = {"hmt": "hmt", "hmt_stage1": "hmt_stage1", "hmt_stage_1": "hmt_stage1", "stage1": "hmt_stage1",
               "rmt": "rmt", "rmt_only": "rmt", "baseline": "baseline", "baseline_only": "baseline"}


def published_mode(args: Mapping[str, Any]) -> str:
    """The mode the published flags select (``--baseline_only``, ``--rmt_only``,
    ``--hmt_stage_1``; full HMT otherwise), or a ``mode`` entry (reference cases)."""
    if args.get("mode") is not None and not any(args.get(f) for f in ("baseline_only", "rmt_only", "hmt_stage_1")):
        name = str(args["mode"])
        if name not in _MODE_NAMES:
            raise ValueError(f"mode={name!r} in the published settings is unknown; use one of {sorted(_MODE_NAMES)}.")
        return _MODE_NAMES[name]
    if args.get("baseline_only"):
        return "baseline"
    if args.get("rmt_only"):
        return "rmt"
    if args.get("hmt_stage_1"):
        return "hmt_stage1"
    return "hmt"


def hmt_config_from_published(args: Mapping[str, Any], **overrides: Any) -> HMTConfig:
    """An :class:`HMTConfig` from the published code's argument names (e.g. a reference
    case's ``case.json``, or its command line as a dict). Settings it does not give take the
    published code's defaults (``PUBLISHED_DEFAULTS``); unknown names are ignored; the score
    scale is the published one (``1/d_h`` when d and d_h are both >= 4096).

    The published code reads ``segment_length - 2 * memory_size - num_sensory`` new tokens per
    segment in every mode (``memory_size`` 0 with ``--baseline_only``), though only HMT
    places sensory tokens. Our ``rmt`` and ``baseline`` leave no room for them, so an
    ``--rmt_only`` / ``--baseline_only`` run maps to ``segment_length - num_sensory``: the
    same new tokens per segment, and the backbone call the published code makes."""
    # The published initialisation too: a model built from these settings and trained further
    # without the converted weights starts its memory as the published code would.
    values: Dict[str, Any] = {
        "mode": published_mode(args), "score_scale": "published", "memory_init": "published",
    }
    given = {**PUBLISHED_DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    for theirs, ours in PUBLISHED_HPARAMS.items():
        if given.get(theirs) is not None:
            values[ours] = given[theirs]
    if values["mode"] in ("rmt", "baseline") and "segment_length" in values:
        values["segment_length"] -= int(given.get("num_sensory") or 0)
    recall_dtype = published_recall_dtype(args)
    if recall_dtype is not None:
        values["recall_dtype"] = recall_dtype
    values.update(overrides)
    return HMTConfig(**values)


def published_recall_dtype(args: Mapping[str, Any]) -> Optional[str]:
    """The recall precision a published run's settings state: ``recall_dtype`` if given,
    ``"bfloat16"`` for ``stock_recall: true`` (the stock published code keeps its recall in
    bfloat16; reference cases say so with this flag), else None (not stated: the converter
    then reads it off the dtype of ``cross_attn.wq.weight``)."""
    if args.get("recall_dtype") is not None:
        return str(args["recall_dtype"])
    if args.get("stock_recall"):
        return "bfloat16"
    return None


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DDP/DeepSpeed/accelerate add to every key."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def split_published_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split a published ``RecurrentWrapper`` state dict into (HMT parameters under our
    names, backbone parameters under their Hugging Face names)."""
    state_dict = strip_wrapper_prefixes(state_dict)
    hmt_part, backbone = {}, {}
    for key, value in state_dict.items():
        if key in PUBLISHED_KEYS:
            hmt_part[PUBLISHED_KEYS[key]] = value
        elif key.startswith(PUBLISHED_BACKBONE_PREFIX):
            backbone[key[len(PUBLISHED_BACKBONE_PREFIX) :]] = value
        elif key.startswith(PUBLISHED_UNUSED_PREFIXES):
            continue
        else:
            raise KeyError(
                f"unexpected key {key!r} in a published HMT checkpoint; expected "
                f"{sorted(PUBLISHED_KEYS)} and backbone keys under {PUBLISHED_BACKBONE_PREFIX!r}."
            )
    return hmt_part, backbone


def load_published_hmt(
    model: torch.nn.Module,
    checkpoint: Any,
    *,
    allow_missing_recall: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """Load the HMT parameters of a checkpoint written by the published code into ``model``.

    Args:
        model (HMT): the model to fill (its backbone is loaded separately, e.g. through
            torchtune's HF checkpointer).
        checkpoint: a path to a ``torch.save``'d state dict, or the state dict itself.
        allow_missing_recall (Optional[bool]): accept a checkpoint without the recall
            parameters (a stage-1 checkpoint loaded for stage 2; they keep their
            initialisation). Default: True when the checkpoint has no recall keys at all.

    Returns:
        Dict[str, torch.Tensor]: the checkpoint's backbone tensors under their Hugging Face
        names (``model.layers.0.self_attn.q_proj.weight``, ...), for callers that want them.

    Raises:
        KeyError / ValueError: naming the key whose presence or shape does not fit.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hmt_part, backbone = split_published_state_dict(checkpoint)
    ours = dict(model.named_parameters())
    wanted = [n for n in ours if not n.startswith("backbone.")]
    recall_names = [n for n in wanted if n.startswith("recall.") or n == "summary_token"]
    if allow_missing_recall is None:
        allow_missing_recall = not any(n in hmt_part for n in recall_names)
    for name in wanted:
        if name not in hmt_part:
            if allow_missing_recall and name in recall_names:
                continue
            theirs = next(k for k, v in PUBLISHED_KEYS.items() if v == name)
            raise KeyError(
                f"the checkpoint has no {theirs!r} (our {name!r}); it was written for another "
                f"mode than this model's {model.config.mode!r}."
            )
    with torch.no_grad():
        for name, value in hmt_part.items():
            if name not in ours:
                raise KeyError(
                    f"the checkpoint has {name!r} but this {model.config.mode!r} model has no such "
                    "parameter; build the model with mode='hmt'."
                )
            target = ours[name]
            if tuple(value.shape) != tuple(target.shape):
                theirs = next(k for k, v in PUBLISHED_KEYS.items() if v == name)
                raise ValueError(
                    f"{theirs!r} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(target.shape)}: check the backbone size and recall_hidden_dim "
                    "(mem_recall_hidden_dim)."
                )
            target.copy_(value.to(target.dtype))
    return backbone
