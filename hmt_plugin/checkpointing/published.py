"""The published HMT code's format (OswaldHe/HMT-pytorch), in one place: its hyperparameter
names and the keys of its ``RecurrentWrapper.state_dict()`` mapped to ours, the HMT
parameters of such a state dict loaded into a model (:func:`load_published_hmt`), and the
conversion of its checkpoints to our checkpoint directories and back
(:func:`convert_from_reference`, :func:`convert_to_reference`).

A directory converted from the published code keeps ``published_extras.safetensors``: the
published tensors our model has no use for (``memory_cell.mem_map.*``, RoPE ``inv_freq``
buffers), so that :func:`convert_to_reference` gives the original file back tensor for
tensor. The converters read their input lazily and write HF shards one at a time
(:mod:`hmt_plugin.checkpointing.io`); the published ``.pt``, which ``torch.save`` writes in
one go, holds one full copy of the model.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import save_file

from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.hf_backbone import CHECKPOINTER_MODEL_TYPES
from hmt_plugin.checkpointing.hf_config import HF_CONFIG, GIVE_THE_BACKBONE_CONFIG, read_hf_config_file
from hmt_plugin.checkpointing.hmt_files import (
    RECALL_PARAMS,
    load_hmt_checkpoint,
    open_our_checkpoint,
    save_hmt_checkpoint,
)
from hmt_plugin.checkpointing.io import (
    ADAPTER_PT,
    DEFAULT_MAX_SHARD_SIZE,
    PUBLISHED_EXTRAS,
    ConversionError,
    ConversionResult,
    PathLike,
    ShardWriter,
    TensorSource,
    atomic_torch_save,
    open_state_dict,
    progress,
    staged_directory,
)
from hmt_plugin.checkpointing.peft_keys import (
    PEFT_PREFIX,
    PeftParts,
    TuneAdapter,
    merge_embedding_lora,
    merged_hf,
    peft_to_tune_adapter,
    rank_of,
    split_peft_keys,
    tune_adapter_to_peft,
    write_adapter_files,
)
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


PUBLISHED_FLAGS = ("hmt_stage_1", "rmt_only", "baseline_only")
OURS_TO_PUBLISHED = {ours: theirs for theirs, ours in PUBLISHED_KEYS.items()}
# Order of the published ``RecurrentWrapper.state_dict()``: its own ``mem``, then the memory
# cell (``memory``, the backbone, ``mem_map``), then ``cross_attn``.
_HMT_FIRST = ("summary_token", "initial_memory")
_HMT_LAST = ("recall.q_proj.weight", "recall.k_proj.weight")
# What the published main.py's --use_lora wraps (r 8, alpha 32, dropout 0.1), in PEFT's names.
PUBLISHED_LORA_TARGETS = ("embed_tokens", "gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")

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


def _wrapper_prefix(key: str) -> str:
    prefix = ""
    while key.startswith(prefix + "module."):
        prefix += "module."
    return prefix


def _bare(source_key: str) -> str:
    """A published key without its wrapper prefix (``module.``)."""
    return source_key[len(_wrapper_prefix(source_key)):]


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DDP/DeepSpeed/accelerate add to every key."""
    return {_bare(key): value for key, value in state_dict.items()}


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


# ============================================================================ settings
def published_args(hparams: Union[None, PathLike, Mapping[str, Any]] = None, **flags: Any) -> Dict[str, Any]:
    """The published code's settings: a JSON file or dict in its argument names (e.g. a
    reference case's ``case.json``), with ``flags`` (None = not given) on top."""
    args: Dict[str, Any] = {}
    if isinstance(hparams, Mapping):
        args.update(hparams)
    elif hparams is not None:
        path = Path(hparams)
        try:
            args.update(json.loads(path.read_text()))
        except FileNotFoundError as err:
            raise ConversionError(f"{path} does not exist (the HMT settings file).") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConversionError(f"{path} is not valid JSON ({err}).") from err
    args.update({k: v for k, v in flags.items() if v is not None})
    return args


def published_settings(config: HMTConfig, dim: int) -> Tuple[Dict[str, Any], List[str]]:
    """Our :class:`HMTConfig` in the published code's argument names, and what it cannot
    express."""
    # The published rmt/baseline runs set aside num_sensory positions they never fill
    # (see hmt_config_from_published): add them back so it reads the same new tokens.
    unused_sensory = config.num_sensory if config.mode in ("rmt", "baseline") else 0
    args: Dict[str, Any] = {
        "segment_length": config.segment_length + unused_sensory,
        "num_sensory": config.num_sensory,
        "memory_size": config.num_memory_tokens,
        "sum_fraction": config.sum_fraction,
        "mem_recall_hidden_dim": config.recall_hidden_dim or dim,
        "mem_recall_context": config.cache_size,
        "bptt_depth": config.bptt_depth,
    }
    flag = {"hmt_stage1": "hmt_stage_1", "rmt": "rmt_only", "baseline": "baseline_only"}.get(config.mode)
    if flag:
        args[flag] = True
    gaps = []
    if config.num_memory_tokens != 1:
        gaps.append(f"num_memory_tokens={config.num_memory_tokens}: the published main.py hard-codes one memory token.")
    if config.sum_fraction != 0.5:
        gaps.append(f"sum_fraction={config.sum_fraction}: the published code always reads half a segment.")
    if config.score_scale != "published":
        gaps.append(
            f"score_scale={config.score_scale!r}: the published code scales recall scores its own way "
            "(1/sqrt(d_h), or 1/d_h when d and d_h are both >= 4096)."
        )
    if config.uses_recall and config.recall_dtype != "bfloat16":
        gaps.append(
            f"recall_dtype={config.recall_dtype!r}: the published code runs the recall in bfloat16, "
            "so its logits differ slightly (about 1e-3) from this model's."
        )
    return args, gaps


def _settings_from_published(
    args: Mapping[str, Any], hmt_keys: Mapping[str, str], source: TensorSource,
    layout: BackboneLayout, result: ConversionResult, recall_dtype: Optional[str] = "auto",
) -> Tuple[HMTConfig, Dict[str, Any]]:
    """Decide the :class:`HMTConfig` of a published checkpoint from its settings and tensors;
    where they disagree, fail naming the key."""
    args = dict(args)
    defaults = [k for k in PUBLISHED_DEFAULTS if args.get(k) is None]
    for name in defaults:
        args[name] = PUBLISHED_DEFAULTS[name]
    if defaults:
        result.note(f"settings not given, the published code's defaults used: "
                    f"{ {k: PUBLISHED_DEFAULTS[k] for k in defaults} }")
    mode = published_mode(args)
    recall = [n for n in RECALL_PARAMS if n in hmt_keys]
    if recall and len(recall) < len(RECALL_PARAMS):
        missing = OURS_TO_PUBLISHED[next(n for n in RECALL_PARAMS if n not in hmt_keys)]
        raise ConversionError(f"missing key {missing!r}: the checkpoint has only part of the recall weights.")
    if recall and mode != "hmt":
        raise ConversionError(
            f"the checkpoint has 'cross_attn.wq.weight' (memory recall: a stage-2 HMT checkpoint) "
            f"but the settings select mode {mode!r}; drop --hmt_stage_1/--rmt_only/--baseline_only."
        )
    if not recall and mode == "hmt":
        mode = "hmt_stage1"
        result.note("no recall weights ('mem', 'cross_attn.*'): a stage-1 checkpoint, converted in "
                    "mode 'hmt_stage1' (load_hmt_into loads it into an 'hmt' model for stage 2).")
    has_memory = "initial_memory" in hmt_keys
    if mode != "baseline" and not has_memory:
        raise ConversionError(f"missing key 'memory_cell.memory': required in mode {mode!r}.")
    if mode == "baseline" and has_memory:
        raise ConversionError("the checkpoint has 'memory_cell.memory' but --baseline_only was given.")

    overrides: Dict[str, Any] = {"mode": mode}
    if has_memory:
        m = _check_hmt_shape(source, hmt_keys["initial_memory"], None, layout)
        if "memory_size" not in defaults and int(args["memory_size"]) != m:
            raise ConversionError(
                f"shape mismatch: 'memory_cell.memory' holds {m} memory token(s), memory_size={args['memory_size']}."
            )
        args["memory_size"] = m
        if recall:
            _check_hmt_shape(source, hmt_keys["summary_token"], m, layout)
    else:
        args["memory_size"] = 1  # unused in baseline mode; HMTConfig wants >= 1
    if recall:
        d_h = _check_recall_shapes(source, hmt_keys, layout)
        given = args.get("mem_recall_hidden_dim")
        if given is not None and int(given) != d_h:
            raise ConversionError(
                f"shape mismatch: 'cross_attn.wq.weight' is {tuple(source.shape(hmt_keys['recall.q_proj.weight']))} "
                f"(hidden dim {d_h}) but mem_recall_hidden_dim={given}."
            )
        overrides["recall_hidden_dim"] = d_h
        overrides["recall_dtype"] = _recall_dtype(args, source.dtype(hmt_keys["recall.q_proj.weight"]),
                                                  recall_dtype, result)
    config = hmt_config_from_published(args, **overrides)
    recorded = {k: args[k] for k in (*PUBLISHED_HPARAMS, *PUBLISHED_FLAGS) if args.get(k) is not None}
    return config, recorded


def _recall_dtype(args: Mapping[str, Any], stored: torch.dtype, choice: Optional[str],
                  result: ConversionResult) -> Optional[str]:
    """The recall precision of a converted checkpoint: ``choice`` if given (``"model"``: the
    model's dtype), else what the settings state, else the dtype the published code stored
    ``cross_attn.wq`` in (stock: bfloat16, its recall runs in that dtype)."""
    if choice not in (None, "auto"):
        return None if choice == "model" else choice
    stated = published_recall_dtype(args)
    if stated is not None:
        return stated
    if stored in (torch.bfloat16, torch.float16):
        name = str(stored).replace("torch.", "")
        result.note(f"recall weights stored in {name}, as the stock published code keeps them: the "
                    f"recall runs in {name} as there (recall_dtype: {name}); set it to null to "
                    "compute it in the model's dtype.")
        return name
    result.note(f"recall weights stored in {str(stored).replace('torch.', '')}: recall in the model's "
                "dtype (recall_dtype: null). The stock published code runs it in bfloat16; if this "
                "checkpoint came from it through an fp32 consolidation, pass --recall_dtype bfloat16.")
    return None


def _check_hmt_shape(source: TensorSource, key: str, rows: Optional[int], layout: BackboneLayout) -> int:
    shape = source.shape(key)
    if len(shape) != 2 or shape[1] != layout.dim or (rows is not None and shape[0] != rows):
        want = f"[{rows if rows is not None else 'm'}, {layout.dim}]"
        raise ConversionError(
            f"shape mismatch: {key!r} has shape {tuple(shape)}, expected {want} "
            f"(hidden_size={layout.dim} in {layout.source})."
        )
    return int(shape[0])


def _check_recall_shapes(source: TensorSource, hmt_keys: Mapping[str, str], layout: BackboneLayout) -> int:
    q = source.shape(hmt_keys["recall.q_proj.weight"])
    k = source.shape(hmt_keys["recall.k_proj.weight"])
    for key, shape in ((hmt_keys["recall.q_proj.weight"], q), (hmt_keys["recall.k_proj.weight"], k)):
        if len(shape) != 2 or shape[1] != layout.dim or tuple(shape) != tuple(q):
            raise ConversionError(
                f"shape mismatch: {key!r} has shape {tuple(shape)}, expected [d_h, {layout.dim}] "
                "with the same d_h for wq and wk."
            )
    return int(q[0])


# ============================================================================ published keys
@dataclass
class _PublishedParts:
    """A published checkpoint's keys sorted by role (tensors stay in the source)."""

    prefix: str  # wrapper prefix common to every key (``module.``), reproduced on the way back
    hmt: Dict[str, str]  # our HMT name -> source key
    backbone: PeftParts  # HF key -> source key, and LoRA pairs
    peft: bool  # backbone wrapped by peft.get_peft_model
    extras: Dict[str, str]  # published key (no wrapper prefix) -> source key


def _sort_published_keys(source: TensorSource, where: str) -> _PublishedParts:
    keys = source.keys()
    if not keys:
        raise ConversionError(f"{where} holds no tensors.")
    prefixes = {_wrapper_prefix(k) for k in keys}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    hmt: Dict[str, str] = {}
    inner: Dict[str, str] = {}
    extras: Dict[str, str] = {}
    for key in keys:
        bare = _bare(key)
        if bare in PUBLISHED_KEYS:
            hmt[PUBLISHED_KEYS[bare]] = key
        elif bare.startswith(PUBLISHED_UNUSED_PREFIXES):
            extras[bare] = key
        elif bare.startswith(PUBLISHED_BACKBONE_PREFIX):
            inner[bare[len(PUBLISHED_BACKBONE_PREFIX):]] = key
        else:
            raise ConversionError(
                f"unexpected key {key!r} in {where}: not a key of the published HMT "
                f"RecurrentWrapper ({sorted(PUBLISHED_KEYS)}, 'memory_cell.mem_map.*', backbone under "
                f"{PUBLISHED_BACKBONE_PREFIX!r})."
            )
    if not inner:
        raise ConversionError(
            f"{where} holds no backbone tensors under {PUBLISHED_BACKBONE_PREFIX!r}: it is not a "
            "published HMT checkpoint (RecurrentWrapper.state_dict())."
        )
    peft = any(k.startswith(PEFT_PREFIX) for k in inner)
    if peft:
        plain = next((v for k, v in inner.items() if not k.startswith(PEFT_PREFIX)), None)
        if plain is not None:
            raise ConversionError(f"{plain!r} is outside the PEFT wrapper ({PEFT_PREFIX!r}) the other backbone keys are in.")
        inner = {k[len(PEFT_PREFIX):]: v for k, v in inner.items()}
    backbone = split_peft_keys(inner)
    for hf_key in [k for k in backbone.base if k.endswith("rotary_emb.inv_freq")]:
        source_key = backbone.base.pop(hf_key)
        extras[_bare(source_key)] = source_key
    return _PublishedParts(prefix=prefix, hmt=hmt, backbone=backbone, peft=peft, extras=extras)


def _check_lora_shapes(parts: PeftParts, source: TensorSource) -> None:
    for module, pair in parts.embedding.items():
        vocab, dim = source.shape(parts.base[f"{module}.weight"])
        a, b = source.shape(pair["A"]), source.shape(pair["B"])
        if len(a) != 2 or len(b) != 2 or a[1] != vocab or b[0] != dim:
            raise ConversionError(
                f"shape mismatch: embedding LoRA {pair['A']!r} {tuple(a)} / {pair['B']!r} {tuple(b)} do "
                f"not fit the embedding [{vocab}, {dim}] (lora_embedding_A is [r, vocab], B [dim, r])."
            )
    for module, pair in parts.lora.items():
        out_f, in_f = source.shape(parts.base[f"{module}.weight"])
        a, b = source.shape(pair["A"]), source.shape(pair["B"])
        if a[1] != in_f or b[0] != out_f:
            raise ConversionError(
                f"shape mismatch: LoRA {pair['A']!r} {tuple(a)} / {pair['B']!r} {tuple(b)} do not fit "
                f"the base weight [{out_f}, {in_f}]."
            )


# ============================================================================ from-reference
def convert_from_reference(
    checkpoint: PathLike,
    output_dir: PathLike,
    *,
    hf_config: Union[None, PathLike, Mapping[str, Any]] = None,
    hparams: Union[None, PathLike, Mapping[str, Any]] = None,
    lora: str = "merge",
    lora_alpha: Optional[float] = None,
    lora_rank: Optional[int] = None,
    recall_dtype: Optional[str] = "auto",
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionResult:
    """A checkpoint of the published HMT code -> one of our checkpoint directories.

    Args:
        checkpoint: ``torch.save(RecurrentWrapper.state_dict())`` (with or without
            ``module.`` prefixes), a consolidated DeepSpeed ZeRO fp32 state dict (output of
            ``zero_to_fp32.py``), a ``.safetensors`` state dict, or a directory of shards.
        output_dir: our checkpoint directory to create (must be empty or absent).
        hf_config: the backbone's HF ``config.json`` (file, its directory, or a dict). If
            None, the ``hf_config`` entry of ``hparams`` is used (reference cases carry one).
        hparams: HMT settings in the published code's names (a JSON file or dict, e.g. a
            reference case's ``case.json``); missing ones take the published defaults.
        lora: for PEFT LoRA weights (``base_layer``, ``lora_A.default``, ...): ``"merge"``
            them into the backbone (``W + alpha/r * B @ A``) or ``"keep"`` them as a torchtune
            adapter (``adapter_model.pt``, ``adapter_model.safetensors``, ``adapter_config.json``).
            An embedding adapter (``lora_embedding_A/B``, which the published ``--use_lora``
            adds) is merged in both modes: torchtune has no LoRA embedding. With ``"keep"`` its
            original tensors are kept beside, so :func:`convert_to_reference` writes them back.
        lora_alpha: LoRA alpha of the published run; None: ``lora_alpha`` (or ``lora.alpha``)
            of ``hparams``, else 32 (its main.py's).
        lora_rank: r, checked against the weights (inferred from them when None; ``lora.r``
            of ``hparams`` is checked too).
        recall_dtype: ``HMTConfig.recall_dtype`` of the result. ``"auto"``: as ``hparams``
            state it (``recall_dtype``, or ``stock_recall: true`` for bfloat16), else the dtype
            ``cross_attn.wq.weight`` is stored in when it is bfloat16/float16 (the stock
            published code's), else the model's dtype. ``"model"``: the model's dtype.
        max_shard_size: largest backbone shard (bytes or ``"5GB"``).
        overwrite: write into a non-empty ``output_dir``.
        show_progress: a progress bar per tensor on stderr.

    Returns:
        ConversionResult: the directory and the decisions made.

    Raises:
        ConversionError: wrong architecture, missing/unexpected keys, shape mismatches,
            unreadable files; the message names the key or file.
    """
    if lora not in ("merge", "keep"):
        raise ValueError(f"lora={lora!r}: use 'merge' or 'keep'.")
    checkpoint = Path(checkpoint)
    result = ConversionResult(Path(output_dir))
    args = published_args(hparams)
    if hf_config is None:
        if not isinstance(args.get("hf_config"), Mapping):
            raise ConversionError(
                "no HF config.json given: the published checkpoints do not carry it; pass the "
                "config.json of the backbone (--hf_config)."
            )
        hf_config = args["hf_config"]
    hf = read_hf_config_file(hf_config, hint=GIVE_THE_BACKBONE_CONFIG)
    layout = BackboneLayout.from_hf_config(hf.values, source=hf.name)
    source = open_state_dict(checkpoint)
    where = str(checkpoint)
    parts = _sort_published_keys(source, where)
    backbone = parts.backbone
    layout.check({k: source.shape(v) for k, v in backbone.base.items()}, where)
    _check_lora_shapes(backbone, source)
    config, recorded = _settings_from_published(args, parts.hmt, source, layout, result, recall_dtype)
    tied_dropped = _drop_tied_head(backbone, source, layout, where)

    adapter: Optional[TuneAdapter] = None
    embedding_lora: Dict[str, Any] = {}
    if backbone.lora or backbone.embedding:
        hinted_alpha, hinted_rank = _published_lora(args)
        rank = rank_of(backbone, source.shape, lora_rank if lora_rank is not None else hinted_rank)
        if lora_alpha is None:
            lora_alpha = hinted_alpha if hinted_alpha is not None else 32.0
            if hinted_alpha is None:
                result.note("LoRA alpha not given: 32, the published main.py's (--lora_alpha to change).")
        lora_alpha = float(lora_alpha)
        if backbone.lora:
            adapter = peft_to_tune_adapter(backbone, source.get, layout, rank, lora_alpha)
            result.note(f"LoRA (r={rank}, alpha={lora_alpha}, {len(backbone.lora)} linear modules) "
                        + ("merged into the backbone." if lora == "merge" else "kept as a torchtune adapter."))
        for module, pair in backbone.embedding.items():
            embedding_lora[f"{module}.weight"] = {"A": pair["A"], "B": pair["B"], "alpha": lora_alpha}
            result.note(f"embedding LoRA of {module} (r={rank}, alpha={lora_alpha}) merged into the "
                        "embedding table" + (": torchtune has no LoRA embedding, its tensors are kept "
                        f"in {PUBLISHED_EXTRAS} for to-reference." if lora == "keep" else "."))
    merge = adapter if lora == "merge" else None
    if lora == "keep":
        for hf_key, pair in embedding_lora.items():
            for source_key in (backbone.base[hf_key], pair["A"], pair["B"]):
                parts.extras[_bare(source_key)] = source_key

    extra = {
        "backbone": {"format": "hf", "model_type": layout.model_type,
                     "checkpointer_model_type": CHECKPOINTER_MODEL_TYPES[layout.model_type]},
        "converted_from": {"format": "published-hmt", "file": checkpoint.name, "published_args": recorded},
        "published": {
            "key_prefix": parts.prefix,
            "peft_wrapped": parts.peft,
            "adapter_name": backbone.adapter_name,
            "lora": None if adapter is None else ("merged" if merge else "kept"),
            "extras": PUBLISHED_EXTRAS if parts.extras else None,
            "extras_order": list(parts.extras),
            "tied_lm_head": tied_dropped,
            "embedding_lora": None if lora != "keep" or not embedding_lora else {
                hf_key: {"base": _bare(backbone.base[hf_key]), "A": _bare(pair["A"]),
                         "B": _bare(pair["B"]), "alpha": pair["alpha"]}
                for hf_key, pair in embedding_lora.items()
            },
        },
    }
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        items = list(backbone.base.items())
        for hf_key, key in progress(items, desc="backbone", enabled=show_progress):
            tensor = merged_hf(hf_key, source.get(key), merge, layout)
            if hf_key in embedding_lora:
                pair = embedding_lora[hf_key]
                tensor = merge_embedding_lora(tensor, source.get(pair["A"]), source.get(pair["B"]), pair["alpha"])
            writer.add(hf_key, tensor)
        writer.close()
        (stage / HF_CONFIG).write_bytes(hf.raw)
        save_hmt_checkpoint(stage, {n: source.get(k) for n, k in parts.hmt.items()}, config, extra)
        if parts.extras:
            save_file({k: source.get(v).contiguous() for k, v in parts.extras.items()},
                      str(stage / PUBLISHED_EXTRAS), metadata={"format": "pt"})
        if adapter is not None and merge is None:
            write_adapter_files(stage, adapter, layout)
    result.note(f"wrote {result.output} (backbone {layout.model_type} from {hf.name}, HMT mode {config.mode!r}).")
    return result


def _published_lora(args: Mapping[str, Any]) -> Tuple[Optional[float], Optional[int]]:
    """LoRA (alpha, r) as the settings state them: ``lora_alpha`` / ``lora_r``, or a ``lora``
    block ``{r, alpha}`` (reference cases). The published main.py has no such flags (it uses
    r 8, alpha 32)."""
    block = args.get("lora") if isinstance(args.get("lora"), Mapping) else {}
    alpha = args.get("lora_alpha", block.get("alpha"))
    rank = args.get("lora_r", block.get("r"))
    return (None if alpha is None else float(alpha)), (None if rank is None else int(rank))


def _drop_tied_head(parts: PeftParts, source: TensorSource, layout: BackboneLayout, where: str) -> bool:
    """An ``nn.Module.state_dict()`` lists a tied ``lm_head.weight`` beside the embeddings;
    HF files omit it. Drop it when it equals the embeddings (it comes back on the way out)."""
    if not layout.tie_word_embeddings or "lm_head.weight" not in parts.base:
        return False
    head = source.get(parts.base["lm_head.weight"])
    embed = source.get(parts.base["model.embed_tokens.weight"])
    if not torch.equal(head, embed):
        raise ConversionError(
            f"{where}: {parts.base['lm_head.weight']!r} differs from the token embeddings but "
            "config.json says tie_word_embeddings=true; give the right config.json."
        )
    del parts.base["lm_head.weight"]
    return True


# ============================================================================ to-reference
def convert_to_reference(
    checkpoint_dir: PathLike,
    output: PathLike,
    *,
    lora: str = "auto",
    hparams_output: Optional[PathLike] = None,
    show_progress: bool = True,
) -> ConversionResult:
    """One of our checkpoint directories -> a state dict the published HMT code loads
    (``torch.load`` + strict ``RecurrentWrapper.load_state_dict``), plus its settings in the
    published argument names and the backbone's config (``<output stem>.hparams.json``, also
    usable as ``hparams`` of :func:`convert_from_reference`).

    Args:
        checkpoint_dir: our checkpoint directory (HF backbone, optional LoRA adapter, HMT files).
        output: the ``.pt``/``.bin`` file to write.
        lora: ``"merge"`` the adapter into the backbone; ``"peft"`` write it in the PEFT layout
            of a published ``--use_lora`` run (``base_layer``, ``lora_A.default``, ...);
            ``"auto"``: ``peft`` when the directory came from such a run with LoRA kept, else
            ``merge``.
        hparams_output: where to write the settings (default beside ``output``).
        show_progress: a progress bar per tensor on stderr.

    Tensors the published model has but ours does not (``memory_cell.mem_map.*``) are the
    originals when the directory came from the published code, else identity matrices (unused
    by its forward; a note says so).
    """
    if lora not in ("auto", "merge", "peft"):
        raise ValueError(f"lora={lora!r}: use 'auto', 'merge' or 'peft'.")
    ours = open_our_checkpoint(checkpoint_dir)
    layout, adapter = ours.layout, ours.adapter
    hmt_sd, config, meta = load_hmt_checkpoint(ours.directory)
    beyond = [f"memory_scale={config.memory_scale!r}"] if config.memory_scale != "published" else []
    beyond += ["memory_sink=True"] if config.memory_sink else []
    if beyond:
        raise ConversionError(
            f"{ours.directory} was trained with {' and '.join(beyond)}, which the published code "
            "cannot compute (it writes the final-norm hidden state as it is and reads "
            "[P_n; sensory; x_n; P_n]): its model would read otherwise. Only checkpoints with "
            "memory_scale='published' and memory_sink=False convert to the published format."
        )
    published = meta.get("published") or {}
    output = Path(output)
    result = ConversionResult(output)
    embedding_lora = published.get("embedding_lora") or {}
    if lora == "auto":
        kept = published.get("lora") == "kept" or bool(embedding_lora)
        lora = "peft" if (adapter is not None or embedding_lora) and kept else "merge"
    if lora == "peft" and adapter is None and not embedding_lora:
        raise ConversionError(f"lora='peft' but {ours.directory} has no adapter ({ADAPTER_PT}).")
    wrapped = lora == "peft"
    backbone_prefix = PUBLISHED_BACKBONE_PREFIX + (PEFT_PREFIX if wrapped else "")
    adapter_name = published.get("adapter_name") or "default"
    lora_keys = _peft_lora_by_module(adapter, layout, adapter_name) if wrapped and adapter is not None else {}
    merge = adapter if (adapter is not None and not wrapped) else None
    if merge is not None:
        result.note(f"LoRA adapter (r={adapter.rank}, alpha={adapter.alpha}) merged into the backbone.")
    targets = ([] if adapter is None else adapter.target_modules()) + (["embed_tokens"] if embedding_lora else [])
    if wrapped and (adapter is None or (adapter.rank, adapter.alpha) != (8, 32.0)
                    or sorted(targets) != sorted(PUBLISHED_LORA_TARGETS)):
        shown = "embedding only" if adapter is None else f"r={adapter.rank}, alpha={adapter.alpha}"
        result.note("the published main.py's --use_lora wraps "
                    f"{', '.join(PUBLISHED_LORA_TARGETS)} with r=8, alpha=32; this adapter "
                    f"({shown}, {sorted(targets)}) needs the same LoraConfig there.")

    out: Dict[str, torch.Tensor] = {}
    for name in _HMT_FIRST:
        if name in hmt_sd:
            out[OURS_TO_PUBLISHED[name]] = hmt_sd[name]
    embed = None
    extras = _published_extras(ours.directory, hmt_sd, layout, result)
    # The embedding adapter's original tensors (kept by a --lora keep conversion) travel in
    # the extras file but belong in the backbone, where the embedding is.
    embedding_extras = {k: extras.pop(k) for e in embedding_lora.values()
                        for k in (e["base"], e["A"], e["B"]) if k in extras}
    hf_keys = layout.ordered(ours.backbone.keys())
    for hf_key in progress(hf_keys, desc="backbone", enabled=show_progress):
        tensor = merged_hf(hf_key, ours.backbone.get(hf_key), merge, layout)
        module, param = hf_key.rsplit(".", 1)
        if wrapped and hf_key in embedding_lora:
            out.update(_embedding_lora_back(hf_key, tensor, embedding_lora[hf_key], embedding_extras,
                                            backbone_prefix, adapter_name, result))
        elif module in lora_keys:
            # PEFT keeps a wrapped linear's own parameters under base_layer, LoRA after them.
            out[f"{backbone_prefix}{module}.base_layer.{param}"] = tensor
            if param == "weight":
                for lora_key, lora_tensor in lora_keys[module]:
                    out[backbone_prefix + lora_key] = lora_tensor
        else:
            out[backbone_prefix + hf_key] = tensor
        if hf_key == "model.embed_tokens.weight":
            embed = tensor
    if layout.tie_word_embeddings and backbone_prefix + "lm_head.weight" not in out:
        # nn.Module.state_dict() lists the tied head too; the published strict load wants it.
        out[backbone_prefix + "lm_head.weight"] = embed
    order = [k for k in published.get("extras_order") or [] if k in extras]
    out.update({k: extras[k] for k in order + sorted(set(extras) - set(order))})
    for name in _HMT_LAST:
        if name in hmt_sd:
            out[OURS_TO_PUBLISHED[name]] = hmt_sd[name]
    prefix = published.get("key_prefix") or ""
    if prefix:
        out = {prefix + k: v for k, v in out.items()}
    atomic_torch_save(out, output)

    args, gaps = published_settings(config, layout.dim)
    for gap in gaps:
        result.note(gap)
    if config.mode == "hmt" and "recall.q_proj.weight" not in hmt_sd:
        result.note("mode 'hmt' without recall weights: written as a stage-1 checkpoint "
                    "(load it in the published code with --hmt_stage_2 --load_from_ckpt).")
    hparams_output = Path(hparams_output) if hparams_output else output.with_name(output.stem + ".hparams.json")
    # Flat, in the published names: the file is also a valid --hparams for from-reference.
    record = {**args, "use_lora": wrapped, "checkpoint": output.name, "hf_config": ours.config,
              "notes": list(result.notes)}
    hparams_output.write_text(json.dumps(record, indent=2))
    result.note(f"wrote {output} and {hparams_output}.")
    return result


def _embedding_lora_back(
    hf_key: str, embedding: torch.Tensor, record: Mapping[str, Any], originals: Mapping[str, torch.Tensor],
    backbone_prefix: str, adapter_name: str, result: ConversionResult,
) -> Dict[str, torch.Tensor]:
    """The PEFT layout of a wrapped embedding (``base_layer.weight``, ``lora_embedding_A``,
    ``lora_embedding_B``). The original tensors when the embedding is still their merge (bit
    for bit); if it changed since the conversion, the current table as the base with a zero
    ``lora_embedding_B`` (the same function), and a note."""
    module = hf_key[: -len(".weight")]
    keys = {"base": f"{backbone_prefix}{module}.base_layer.weight",
            "A": f"{backbone_prefix}{module}.lora_embedding_A.{adapter_name}",
            "B": f"{backbone_prefix}{module}.lora_embedding_B.{adapter_name}"}
    have = all(record[k] in originals for k in ("base", "A", "B"))
    if have:
        base, a, b = (originals[record[k]] for k in ("base", "A", "B"))
        if torch.equal(merge_embedding_lora(base, a, b, record["alpha"]), embedding):
            return {keys["base"]: base, keys["A"]: a, keys["B"]: b}
        result.note(f"{hf_key} changed since the conversion: written as the embedding LoRA's base with "
                    "lora_embedding_B zero (the same embedding).")
        return {keys["base"]: embedding, keys["A"]: a, keys["B"]: torch.zeros_like(b)}
    raise ConversionError(
        f"the embedding LoRA tensors of {hf_key} are missing from {PUBLISHED_EXTRAS}; "
        "convert with --lora merge instead."
    )


def _peft_lora_by_module(
    adapter: TuneAdapter, layout: BackboneLayout, adapter_name: str
) -> Dict[str, List[Tuple[str, torch.Tensor]]]:
    """HF module -> its PEFT LoRA (key, tensor) pairs, A before B (PEFT's state-dict order)."""
    grouped: Dict[str, List[Tuple[str, torch.Tensor]]] = {}
    for key, tensor in sorted(tune_adapter_to_peft(adapter, layout, adapter_name).items()):
        module = key.split(".lora_", 1)[0]
        grouped.setdefault(module, []).append((key, tensor))
    return grouped


def _published_extras(
    directory: Path, hmt_sd: Mapping[str, torch.Tensor], layout: BackboneLayout, result: ConversionResult
) -> Dict[str, torch.Tensor]:
    """The published tensors our model lacks: the originals if kept, else ``mem_map`` as
    identity matrices (its forward never uses them; its strict load needs them)."""
    path = directory / PUBLISHED_EXTRAS
    if path.is_file():
        source = open_state_dict(path)
        return {k: source.get(k) for k in source.keys()}
    dtype = hmt_sd["initial_memory"].dtype if "initial_memory" in hmt_sd else torch.float32
    eye = torch.eye(layout.dim, dtype=dtype)
    result.note("memory_cell.mem_map.{linear,inv_linear}.weight written as identity matrices "
                "(not trained here; the published forward does not use them).")
    return {"memory_cell.mem_map.linear.weight": eye, "memory_cell.mem_map.inv_linear.weight": eye.clone()}
