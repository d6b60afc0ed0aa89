"""Checkpoint conversion: the published HMT code's state dicts, our checkpoint directories,
plain Hugging Face directories and Meta's consolidated format, both ways.

Our checkpoint directory (see :mod:`hmt_plugin.checkpointing.hmt_files`) is what torchtune's
``FullModelHFCheckpointer`` writes for the backbone (HF shards + index + ``config.json``, and
``adapter_model.pt``/``adapter_model.safetensors``/``adapter_config.json`` for LoRA) plus
``hmt_model.safetensors`` and ``hmt_config.json``. A directory converted from the published
code also keeps ``published_extras.safetensors``: the published tensors our model has no use
for (``memory_cell.mem_map.*``, RoPE ``inv_freq`` buffers), so that :func:`convert_to_reference`
gives the original file back tensor for tensor.

Every converter reads its input lazily and writes HF shards one at a time
(:mod:`hmt_plugin.checkpointing.io`); only the single-file outputs (the published
``.pt`` and Meta's ``consolidated.00.pth``, which ``torch.save`` writes in one go) hold one
full copy of the model.
"""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import save_file
from torchtune.models import convert_weights

from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.hf_backbone import CHECKPOINTER_MODEL_TYPES, rope_theta_of
from hmt_plugin.checkpointing.hmt_files import (
    HMT_CONFIG,
    HMT_WEIGHTS,
    load_hmt_checkpoint,
    save_hmt_checkpoint,
)
from hmt_plugin.checkpointing.peft_keys import (
    ADAPTER_CONFIG,
    ADAPTER_PT,
    ADAPTER_SAFETENSORS,
    PEFT_PREFIX,
    PeftParts,
    TuneAdapter,
    adapter_files,
    load_adapter,
    merge_embedding_lora,
    peft_to_tune_adapter,
    rank_of,
    split_peft_keys,
    tune_adapter_to_peft,
)
from hmt_plugin.checkpointing.published import (
    PUBLISHED_BACKBONE_PREFIX,
    PUBLISHED_DEFAULTS,
    PUBLISHED_HPARAMS,
    PUBLISHED_KEYS,
    PUBLISHED_UNUSED_PREFIXES,
    hmt_config_from_published,
    published_mode,
    published_recall_dtype,
)
from hmt_plugin.checkpointing.io import (
    DEFAULT_MAX_SHARD_SIZE,
    PUBLISHED_EXTRAS,
    ConversionError,
    ShardWriter,
    TensorSource,
    atomic_torch_save,
    copy_side_files,
    open_state_dict,
    progress,
    staged_directory,
)
from hmt_plugin.modules.hmt_config import HMTConfig

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
HF_CONFIG = "config.json"
META_WEIGHTS = "consolidated.00.pth"
META_PARAMS = "params.json"

PUBLISHED_FLAGS = ("hmt_stage_1", "rmt_only", "baseline_only")
OURS_TO_PUBLISHED = {ours: theirs for theirs, ours in PUBLISHED_KEYS.items()}
RECALL_NAMES = ("summary_token", "recall.q_proj.weight", "recall.k_proj.weight")
# Order of the published ``RecurrentWrapper.state_dict()``: its own ``mem``, then the memory
# cell (``memory``, the backbone, ``mem_map``), then ``cross_attn``.
_HMT_FIRST = ("summary_token", "initial_memory")
_HMT_LAST = ("recall.q_proj.weight", "recall.k_proj.weight")
_SIDE_FILES_TO_SKIP = (HMT_CONFIG, ADAPTER_CONFIG, META_PARAMS)
# What the published main.py's --use_lora wraps (r 8, alpha 32, dropout 0.1), in PEFT's names.
PUBLISHED_LORA_TARGETS = ("embed_tokens", "gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class ConversionResult:
    """What a converter wrote.

    Attributes:
        output (Path): the output file or directory.
        notes (List[str]): decisions the converter made that the user should know about
            (defaults used, values invented, settings the published code does not have).
    """

    output: Path
    notes: List[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        log.info(message)
        self.notes.append(message)


# ============================================================================ settings
def read_hf_config_bytes(source: Union[PathLike, Mapping[str, Any]]) -> Tuple[Dict[str, Any], bytes, str]:
    """``config.json`` as (dict, the exact bytes to write, a name for messages); a file is
    copied byte for byte so round trips leave it unchanged."""
    if isinstance(source, Mapping):
        return dict(source), json.dumps(dict(source), indent=2).encode(), "the given HF config"
    path = Path(source)
    if path.is_dir():
        path = path / HF_CONFIG
    if not path.is_file():
        raise ConversionError(
            f"no config.json at {path}: give the HF config.json of the backbone (the published "
            "checkpoints do not carry it; it is the one of --model_name)."
        )
    raw = path.read_bytes()
    try:
        return json.loads(raw), raw, str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON ({err}).") from err


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
    recall = [n for n in RECALL_NAMES if n in hmt_keys]
    if recall and len(recall) < len(RECALL_NAMES):
        missing = OURS_TO_PUBLISHED[next(n for n in RECALL_NAMES if n not in hmt_keys)]
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


def _wrapper_prefix(key: str) -> str:
    prefix = ""
    while key.startswith(prefix + "module."):
        prefix += "module."
    return prefix


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
        bare = key[len(_wrapper_prefix(key)):]
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
        extras[source_key[len(_wrapper_prefix(source_key)):]] = source_key
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
    cfg, cfg_bytes, cfg_name = read_hf_config_bytes(hf_config)
    layout = BackboneLayout.from_hf_config(cfg, source=cfg_name)
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
                parts.extras[source_key[len(_wrapper_prefix(source_key)):]] = source_key

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
            tensor = _merged_hf(hf_key, source.get(key), merge, layout)
            if hf_key in embedding_lora:
                pair = embedding_lora[hf_key]
                tensor = merge_embedding_lora(tensor, source.get(pair["A"]), source.get(pair["B"]), pair["alpha"])
            writer.add(hf_key, tensor)
        writer.close()
        (stage / HF_CONFIG).write_bytes(cfg_bytes)
        save_hmt_checkpoint(stage, {n: source.get(k) for n, k in parts.hmt.items()}, config, extra)
        if parts.extras:
            save_file({k: source.get(v).contiguous() for k, v in parts.extras.items()},
                      str(stage / PUBLISHED_EXTRAS), metadata={"format": "pt"})
        if adapter is not None and merge is None:
            _write_adapter(stage, adapter, layout)
    result.note(f"wrote {result.output} (backbone {layout.model_type} from {cfg_name}, HMT mode {config.mode!r}).")
    return result


def _bare(source_key: str) -> str:
    """A published key without its wrapper prefix (``module.``)."""
    return source_key[len(_wrapper_prefix(source_key)):]


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


def _merged_hf(hf_key: str, tensor: torch.Tensor, adapter: Optional[TuneAdapter], layout: BackboneLayout) -> torch.Tensor:
    """``tensor`` with its LoRA merged (in torchtune's layout, by torchtune's merge), or as is."""
    if adapter is None:
        return tensor
    converted = layout.hf_to_tune(hf_key, tensor)
    if converted is None:
        return tensor
    tune_key, tune_tensor = converted
    merged = adapter.merge_into(tune_key, tune_tensor)
    if merged is tune_tensor:
        return tensor
    return layout.tune_to_hf(tune_key, merged)[1]


def _write_adapter(directory: Path, adapter: TuneAdapter, layout: BackboneLayout) -> None:
    """The adapter files torchtune's HF checkpointer writes for LoRA training."""
    tune_sd, peft_sd, config = adapter_files(adapter, layout)
    torch.save(tune_sd, directory / ADAPTER_PT)
    save_file({k: v.contiguous() for k, v in peft_sd.items()}, str(directory / ADAPTER_SAFETENSORS),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


# ============================================================================ our directory
@dataclass
class _OurCheckpoint:
    """One of our checkpoint directories, opened lazily."""

    directory: Path
    config: Dict[str, Any]
    config_bytes: bytes
    layout: BackboneLayout
    backbone: TensorSource
    adapter: Optional[TuneAdapter]


def _open_ours(directory: PathLike) -> _OurCheckpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory} is not a checkpoint directory.")
    cfg, raw, cfg_name = read_hf_config_bytes(directory)
    layout = BackboneLayout.from_hf_config(cfg, source=cfg_name)
    backbone = open_state_dict(directory)
    layout.check(backbone.shapes(), str(directory))
    return _OurCheckpoint(directory, cfg, raw, layout, backbone, load_adapter(directory, layout))


def _copy_hmt_files(source: Path, target: Path) -> List[str]:
    copied = []
    for name in (HMT_WEIGHTS, HMT_CONFIG, PUBLISHED_EXTRAS):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


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
    ours = _open_ours(checkpoint_dir)
    layout, adapter = ours.layout, ours.adapter
    hmt_sd, config, meta = load_hmt_checkpoint(ours.directory)
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
        tensor = _merged_hf(hf_key, ours.backbone.get(hf_key), merge, layout)
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


# ============================================================================ export-hf
def export_hf(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    *,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionResult:
    """One of our checkpoint directories -> an HF directory with the LoRA adapter (if any)
    merged into the backbone, ``config.json``, the tokenizer and other small files, and our
    HMT files beside. torchtune's ``FullModelHFCheckpointer`` loads it, and
    ``transformers`` loads the backbone alone (``AutoModelForCausalLM.from_pretrained``)."""
    ours = _open_ours(checkpoint_dir)
    result = ConversionResult(Path(output_dir))
    if ours.adapter is not None:
        result.note(f"LoRA adapter (r={ours.adapter.rank}, alpha={ours.adapter.alpha}) merged.")
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        keys = ours.layout.ordered(ours.backbone.keys())
        for key in progress(keys, desc="export-hf", enabled=show_progress):
            writer.add(key, _merged_hf(key, ours.backbone.get(key), ours.adapter, ours.layout))
        writer.close()
        copy_side_files(ours.directory, stage, skip=_SIDE_FILES_TO_SKIP)
        _copy_hmt_files(ours.directory, stage)
    return result


# ============================================================================ Meta format
def _meta_ffn_dim(dim: int, multiple_of: int, multiplier: Optional[float]) -> int:
    """The FFN width Meta's Llama code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params_from_hf(cfg: Mapping[str, Any], layout: BackboneLayout) -> Dict[str, Any]:
    """``params.json`` for Meta's Llama code. It has no FFN width, only ``multiple_of`` and
    ``ffn_dim_multiplier``: Meta's usual 256 when that reproduces ``intermediate_size``, else
    values chosen to reproduce it."""
    hidden = layout.intermediate_dim
    multiple_of, multiplier = 256, None
    if _meta_ffn_dim(layout.dim, multiple_of, multiplier) != hidden:
        base = int(2 * (4 * layout.dim) / 3)
        multiple_of = hidden
        multiplier = None if base <= hidden else (hidden - 0.5) / base
    assert _meta_ffn_dim(layout.dim, multiple_of, multiplier) == hidden
    params = {
        "dim": layout.dim,
        "n_layers": layout.num_layers,
        "n_heads": layout.num_heads,
        "n_kv_heads": layout.num_kv_heads,
        "vocab_size": layout.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_theta": rope_theta_of(cfg),
    }
    # transformers 4 writes rope_scaling, transformers 5 rope_parameters.
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if scaling.get("rope_type") == "llama3":
        params["use_scaled_rope"] = True
    return params


def hf_config_from_meta(params: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]],
                        dtype: torch.dtype, max_seq_len: Optional[int] = None) -> Dict[str, Any]:
    """An HF ``LlamaForCausalLM`` config.json from Meta's params.json and the tensor shapes
    (params.json gives no FFN width or, in Llama 2, vocabulary size)."""
    if params.get("use_scaled_rope"):
        raise ConversionError(
            "params.json sets use_scaled_rope (Llama 3.1+): give the model's HF config.json "
            "(--hf_config), whose rope_scaling block this converter cannot invent."
        )
    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if key not in shapes:
            raise ConversionError(f"missing key {key!r}: not a Meta Llama checkpoint.")
    vocab, dim = shapes["tok_embeddings.weight"]
    heads = int(params["n_heads"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(dim),
        "intermediate_size": int(shapes["layers.0.feed_forward.w1.weight"][0]),
        "num_hidden_layers": int(params["n_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or heads),
        "vocab_size": int(vocab),
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(max_seq_len or 4096),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def _require_llama(layout: BackboneLayout) -> None:
    if layout.model_type != "llama":
        raise ConversionError(
            f"Meta's format is Llama's; {layout.source} has model_type={layout.model_type!r}. "
            "Use export-hf for this backbone."
        )


def convert_to_meta(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    *,
    lora: str = "merge",
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionResult:
    """One of our checkpoint directories (Llama backbone) -> Meta's layout:
    ``consolidated.00.pth`` (torchtune's ``tune_to_meta`` keys) + ``params.json``, with
    ``config.json`` (for the way back), the HMT files and small side files beside.

    Args:
        lora: ``"merge"`` a LoRA adapter into the weights, or ``"keep"`` its torchtune files
            beside (torchtune's layout is Meta's, so they apply to these weights as they are).
    """
    if lora not in ("merge", "keep"):
        raise ValueError(f"lora={lora!r}: use 'merge' or 'keep'.")
    ours = _open_ours(checkpoint_dir)
    layout = ours.layout
    _require_llama(layout)
    result = ConversionResult(Path(output_dir))
    merge = ours.adapter if lora == "merge" else None
    meta_sd: Dict[str, torch.Tensor] = {}
    for hf_key in progress(layout.ordered(ours.backbone.keys()), desc="to-meta", enabled=show_progress):
        converted = layout.hf_to_tune(hf_key, ours.backbone.get(hf_key))
        if converted is None:
            continue
        tune_key, tensor = converted
        if merge is not None:
            tensor = merge.merge_into(tune_key, tensor)
        meta_sd.update(convert_weights.tune_to_meta({tune_key: tensor}))
    if "output.weight" not in meta_sd:
        # Meta's code always has an output projection; tied models share the embeddings.
        meta_sd["output.weight"] = meta_sd["tok_embeddings.weight"]
        result.note("tied embeddings: output.weight written as the token embeddings.")
    if merge is not None:
        result.note(f"LoRA adapter (r={merge.rank}, alpha={merge.alpha}) merged.")
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        torch.save(meta_sd, stage / META_WEIGHTS)
        del meta_sd
        (stage / META_PARAMS).write_text(json.dumps(meta_params_from_hf(ours.config, layout), indent=2))
        (stage / HF_CONFIG).write_bytes(ours.config_bytes)
        copy_side_files(ours.directory, stage, skip=(HMT_CONFIG, ADAPTER_CONFIG, META_PARAMS, HF_CONFIG))
        _copy_hmt_files(ours.directory, stage)
        if ours.adapter is not None and merge is None:
            for name in (ADAPTER_PT, ADAPTER_SAFETENSORS, ADAPTER_CONFIG):
                if (ours.directory / name).is_file():
                    shutil.copy2(ours.directory / name, stage / name)
    return result


def _meta_weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    if not source.is_dir():
        raise ConversionError(f"{source} does not exist.")
    files = sorted(source.glob("*.pth"))
    if len(files) > 1:
        raise ConversionError(
            f"{source} holds {len(files)} .pth files ({files[0].name}, ...): model-parallel shards "
            "of a Meta checkpoint; merge them into one consolidated.00.pth first (torchtune reads "
            "one file as well)."
        )
    if not files:
        raise ConversionError(f"{source} holds no {META_WEIGHTS}.")
    return files[0]


def _meta_to_hf_key(meta_key: str, layout: BackboneLayout, where: Path) -> Optional[str]:
    if meta_key == "rope.freqs":
        return None
    try:
        tune_key = convert_weights.get_mapped_key(meta_key, convert_weights._FROM_META)
        return layout.tune_key_to_hf(tune_key)
    except Exception as err:  # noqa: BLE001 - torchtune raises a bare Exception
        raise ConversionError(f"unexpected key {meta_key!r} in {where}: not a Meta Llama key.") from err


def convert_from_meta(
    meta_dir: PathLike,
    output_dir: PathLike,
    *,
    hf_config: Union[None, PathLike, Mapping[str, Any]] = None,
    max_seq_len: Optional[int] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ConversionResult:
    """Meta's layout (``consolidated.00.pth`` + ``params.json``) -> our checkpoint directory
    (HF shards via torchtune's ``meta_to_tune`` and ``tune_to_hf``), carrying HMT, adapter and
    side files found beside.

    Args:
        hf_config: the HF config.json to write; default the ``config.json`` beside the weights
            (written by :func:`convert_to_meta`), else one derived from ``params.json`` and
            the tensor shapes.
        max_seq_len: ``max_position_embeddings`` of a derived config (default 4096).
    """
    meta_dir = Path(meta_dir)
    weights = _meta_weights_file(meta_dir)
    folder = weights.parent
    result = ConversionResult(Path(output_dir))
    source = open_state_dict(weights)
    if hf_config is None and (folder / HF_CONFIG).is_file():
        hf_config = folder / HF_CONFIG
    if hf_config is not None:
        cfg, cfg_bytes, cfg_name = read_hf_config_bytes(hf_config)
    else:
        params_path = folder / META_PARAMS
        if not params_path.is_file():
            raise ConversionError(f"{folder} has neither config.json nor {META_PARAMS}; give --hf_config.")
        try:
            params = json.loads(params_path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{params_path} is not valid JSON ({err}).") from err
        dtype = source.dtype("tok_embeddings.weight") if "tok_embeddings.weight" in source else torch.float32
        cfg = hf_config_from_meta(params, source.shapes(), dtype, max_seq_len)
        cfg_bytes, cfg_name = json.dumps(cfg, indent=2).encode(), f"config derived from {params_path}"
        result.note(f"config.json derived from {params_path} and the tensor shapes.")
    layout = BackboneLayout.from_hf_config(cfg, source=cfg_name)
    _require_llama(layout)
    names = {k: _meta_to_hf_key(k, layout, weights) for k in source.keys()}
    names = {k: v for k, v in names.items() if v is not None}
    if layout.tie_word_embeddings and "output.weight" in names:
        # HF files of tied models have no lm_head; convert_to_meta wrote the embeddings there.
        del names["output.weight"]
    layout.check({hf: source.shape(k) for k, hf in names.items()}, str(weights))
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        for meta_key in progress(list(names), desc="from-meta", enabled=show_progress):
            tune = convert_weights.meta_to_tune({meta_key: source.get(meta_key)})
            tune_key, tensor = next(iter(tune.items()))
            writer.add(*layout.tune_to_hf(tune_key, tensor))
        writer.close()
        (stage / HF_CONFIG).write_bytes(cfg_bytes)
        copy_side_files(folder, stage, skip=(META_PARAMS, HF_CONFIG))
        _copy_hmt_files(folder, stage)
        for name in (ADAPTER_PT, ADAPTER_SAFETENSORS):
            if (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)
    return result


__all__ = [
    "ConversionResult",
    "convert_from_meta",
    "convert_from_reference",
    "convert_to_meta",
    "convert_to_reference",
    "export_hf",
    "hf_config_from_meta",
    "meta_params_from_hf",
    "published_args",
    "published_settings",
]
