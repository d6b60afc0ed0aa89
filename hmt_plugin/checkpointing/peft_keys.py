"""LoRA weights in the two layouts this plugin meets.

* PEFT's, inside a model wrapped by ``peft.get_peft_model`` (how the published HMT code trains
  with ``--use_lora``): every key under ``base_model.model.``; a LoRA-wrapped linear keeps its
  weight as ``<module>.base_layer.weight`` and adds ``<module>.lora_A.<adapter>.weight``
  ``[r, in]`` and ``<module>.lora_B.<adapter>.weight`` ``[out, r]`` (adapter ``default``).
  ``adapter_model.safetensors`` files drop the adapter name (``lora_A.weight``). A wrapped
  embedding (the published ``--use_lora`` wraps ``embed_tokens``) keeps
  ``<module>.base_layer.weight`` ``[vocab, dim]`` and adds ``<module>.lora_embedding_A.<adapter>``
  ``[r, vocab]`` and ``<module>.lora_embedding_B.<adapter>`` ``[dim, r]`` (parameters, no
  ``.weight``); it adds ``alpha/r * (B @ A)^T`` to the embedding table.
* torchtune's (``adapter_model.pt`` written by its LoRA recipes):
  ``layers.{i}.attn.{q,k,v,output}_proj.lora_{a,b}.weight``, ``layers.{i}.mlp.w{1,2,3}...``,
  ``output.lora_{a,b}.weight``; B of q/k in torchtune's permuted RoPE row order.

The merge is torchtune's own (``get_merged_lora_ckpt``: ``W + alpha/r * B @ A``), applied one
module at a time. torchtune has no LoRA embedding, so an embedding adapter is always merged
(:func:`merge_embedding_lora`).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from safetensors.torch import save_file
from torchtune.modules.peft import get_merged_lora_ckpt

from hmt_plugin.checkpointing.backbone_layout import BackboneLayout
from hmt_plugin.checkpointing.io import (
    ADAPTER_PT,
    ADAPTER_SAFETENSORS,
    ConversionError,
    open_state_dict,
)

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"

_PEFT_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_PEFT_BASE = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
_PEFT_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>[AB])(?:\.(?P<name>[^.]+))?$")
_PEFT_UNSUPPORTED = ("lora_magnitude_vector",)
_TUNE_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_a|lora_b|magnitude)(?:\.weight)?$")

# torchtune module names -> PEFT/HF target module names (as torchtune writes adapter_config.json).
TUNE_TO_PEFT_TARGETS = {
    "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head",
}


@dataclass
class TuneAdapter:
    """LoRA weights in torchtune's layout and keys.

    Attributes:
        weights: torchtune key (``layers.0.attn.q_proj.lora_a.weight``, ...) -> tensor.
        rank (int): r, the same for every module.
        alpha (float): LoRA alpha; merged weights are ``W + alpha/r * B @ A``.
    """

    weights: Dict[str, torch.Tensor]
    rank: int
    alpha: float
    extra_config: Dict = field(default_factory=dict)

    def modules(self) -> List[str]:
        """torchtune module names that carry LoRA (``layers.0.attn.q_proj``, ...)."""
        return sorted({m.group("module") for k in self.weights if (m := _TUNE_LORA.match(k))})

    def target_modules(self) -> List[str]:
        """PEFT target module names (``q_proj``, ``o_proj``, ``gate_proj``, ...)."""
        return sorted({TUNE_TO_PEFT_TARGETS[m.rsplit(".", 1)[-1]] for m in self.modules()})

    def merge_into(self, tune_key: str, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight of one module (``weight`` untouched), or ``weight`` itself when
        the module has no LoRA. Uses torchtune's ``get_merged_lora_ckpt`` (DoRA included)."""
        module = tune_key[: -len(".weight")] if tune_key.endswith(".weight") else None
        if module is None or f"{module}.lora_a.weight" not in self.weights:
            return weight
        # torchtune merges in place (``+=``): give it a copy, never a tensor of the source file.
        piece = {tune_key: weight.clone()}
        for suffix in ("lora_a.weight", "lora_b.weight", "magnitude"):
            if f"{module}.{suffix}" in self.weights:
                piece[f"{module}.{suffix}"] = self.weights[f"{module}.{suffix}"]
        return get_merged_lora_ckpt(piece, rank=self.rank, alpha=self.alpha)[tune_key]

    def config_json(self) -> Dict:
        """``adapter_config.json`` as torchtune's HF checkpointer writes it (PEFT names)."""
        return {
            **self.extra_config,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": self.target_modules(),
            "peft_type": "LORA",
        }


# ----------------------------------------------------------------------------- PEFT -> ours
@dataclass
class PeftParts:
    """A PEFT-wrapped HF state dict taken apart (keys only; tensors stay in the source).

    Attributes:
        base: plain HF key -> source key (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``).
        lora: HF module (``model.layers.0.self_attn.q_proj``) -> {"A": source key, "B": source key}.
        adapter_name: PEFT adapter name (``default``), or None in ``adapter_model`` files.
        embedding: HF embedding module (``model.embed_tokens``) -> {"A": ``lora_embedding_A``
            source key ``[r, vocab]``, "B": ``lora_embedding_B`` source key ``[dim, r]``}.
    """

    base: Dict[str, str]
    lora: Dict[str, Dict[str, str]]
    adapter_name: Optional[str]
    embedding: Dict[str, Dict[str, str]] = field(default_factory=dict)

    def pairs(self) -> Dict[str, Dict[str, str]]:
        """Every LoRA pair, linear and embedding, by HF module."""
        return {**self.lora, **self.embedding}


def split_peft_keys(keys: Mapping[str, str], *, with_base: bool = True) -> PeftParts:
    """Sort PEFT-layout keys into base weights and LoRA pairs.

    Args:
        keys: key relative to the wrapped HF model (``model.layers.0.self_attn.q_proj.
            base_layer.weight``, prefixes such as ``base_model.model.`` already removed) ->
            the key in the source file (what errors name and what tensors are read by).
        with_base: the keys include the base weights (a wrapped model's state dict), not
            only the adapter (``adapter_model.safetensors``).

    Raises:
        ConversionError: DoRA, an embedding adapter without its base weights, several
            adapters, or an unpaired A/B, naming the key.
    """
    base: Dict[str, str] = {}
    lora: Dict[str, Dict[str, str]] = {}
    embedding: Dict[str, Dict[str, str]] = {}
    names = set()
    for inner, key in keys.items():
        if any(f".{u}" in inner for u in _PEFT_UNSUPPORTED):
            raise ConversionError(
                f"{key!r}: DoRA weights are not covered; merge them with PEFT "
                "(merge_and_unload) before converting."
            )
        if (m := _PEFT_EMBEDDING.match(inner)):
            if not with_base:
                raise ConversionError(
                    f"{key!r}: an embedding LoRA in an adapter file is not covered (torchtune has no "
                    "LoRA embedding); convert the whole published checkpoint, which merges it."
                )
            names.add(m.group("name"))
            embedding.setdefault(m.group("module"), {})[m.group("which")] = key
        elif (m := _PEFT_LORA.match(inner)):
            names.add(m.group("name"))
            lora.setdefault(m.group("module"), {})[m.group("which")] = key
        elif (m := _PEFT_BASE.match(inner)):
            base[f"{m.group('module')}.{m.group('param')}"] = key
        else:
            base[inner] = key
    if len(names) > 1:
        raise ConversionError(f"the checkpoint holds several LoRA adapters {sorted(names)}; keep one.")
    for kind, pairs in (("lora_", lora), ("lora_embedding_", embedding)):
        for module, pair in pairs.items():
            for which, other in (("A", "B"), ("B", "A")):
                if which not in pair:
                    raise ConversionError(
                        f"{pair[other]!r} has no {kind}{which} partner; the adapter is incomplete."
                    )
            if with_base and f"{module}.weight" not in base:
                raise ConversionError(f"{pair['A']!r} has no base weight ({module}.base_layer.weight).")
    return PeftParts(base=base, lora=lora, adapter_name=next(iter(names), None), embedding=embedding)


def rank_of(parts: PeftParts, shape_of, expected: Optional[int] = None) -> int:
    """r from the LoRA A shapes (``[r, in]``, embeddings ``[r, vocab]``); all modules must
    agree (and with ``expected``)."""
    pairs = parts.pairs()
    ranks = {module: shape_of(pair["A"])[0] for module, pair in pairs.items()}
    values = set(ranks.values())
    if len(values) > 1:
        raise ConversionError(f"LoRA ranks differ between modules ({ranks}); one rank is needed.")
    rank = values.pop()
    for module, pair in pairs.items():
        b_shape = shape_of(pair["B"])
        if len(b_shape) != 2 or b_shape[1] != rank:
            raise ConversionError(
                f"shape mismatch: {pair['B']!r} has shape {tuple(b_shape)}; LoRA B must be [out, {rank}]."
            )
    if expected is not None and expected != rank:
        raise ConversionError(
            f"lora_rank={expected} was given but {next(iter(pairs.values()))['A']!r} has rank {rank}."
        )
    return rank


def merge_embedding_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float
) -> torch.Tensor:
    """An embedding table ``[vocab, dim]`` with PEFT's embedding LoRA merged:
    ``W + alpha/r * (B @ A)^T`` for ``lora_embedding_A`` ``[r, vocab]`` and ``lora_embedding_B``
    ``[dim, r]`` (PEFT adds ``alpha/r * A^T[ids] @ B^T`` to the looked-up rows). Computed in
    float32, returned in ``weight``'s dtype; ``weight`` is not modified."""
    rank = lora_a.shape[0]
    delta = (lora_b.float() @ lora_a.float()).T * (float(alpha) / rank)
    return (weight.float() + delta).to(weight.dtype)


def peft_to_tune_adapter(
    parts: PeftParts, get, layout: BackboneLayout, rank: int, alpha: float
) -> TuneAdapter:
    """PEFT LoRA pairs (HF layout) -> torchtune's adapter keys and layout."""
    weights: Dict[str, torch.Tensor] = {}
    for module, pair in sorted(parts.lora.items()):
        tune_module = layout.hf_key_to_tune(f"{module}.weight")[: -len(".weight")]
        lora_b = get(pair["B"])
        if layout.permutes_rows(tune_module):
            lora_b = layout.lora_b_hf_to_tune(f"{module}.weight", lora_b)
        weights[f"{tune_module}.lora_a.weight"] = get(pair["A"])
        weights[f"{tune_module}.lora_b.weight"] = lora_b
    return TuneAdapter(weights=weights, rank=rank, alpha=float(alpha))


# ----------------------------------------------------------------------------- ours -> PEFT
def tune_adapter_to_peft(
    adapter: TuneAdapter, layout: BackboneLayout, adapter_name: Optional[str] = "default"
) -> Dict[str, torch.Tensor]:
    """torchtune adapter -> PEFT keys relative to the HF model
    (``model.layers.0.self_attn.q_proj.lora_A.default.weight``) -> tensor in HF row order.
    ``adapter_name=None`` gives ``adapter_model.safetensors`` keys (``lora_A.weight``)."""
    name = f".{adapter_name}" if adapter_name else ""
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in adapter.weights.items():
        m = _TUNE_LORA.match(key)
        if m is None or m.group("kind") == "magnitude":
            raise ConversionError(f"{key!r} is not a LoRA A/B weight (DoRA is not covered here).")
        module = m.group("module")
        hf_module = layout.tune_key_to_hf(f"{module}.weight")[: -len(".weight")]
        if m.group("kind") == "lora_b" and layout.permutes_rows(module):
            tensor = layout.lora_b_tune_to_hf(key, tensor)
        which = "A" if m.group("kind") == "lora_a" else "B"
        out[f"{hf_module}.lora_{which}{name}.weight"] = tensor
    return out


def merged_hf(hf_key: str, tensor: torch.Tensor, adapter: Optional[TuneAdapter], layout: BackboneLayout) -> torch.Tensor:
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



# ----------------------------------------------------------------------------- files
def has_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_PT).is_file() or (directory / ADAPTER_SAFETENSORS).is_file()


def load_adapter(directory: Path, layout: BackboneLayout) -> Optional[TuneAdapter]:
    """The LoRA adapter of one of our checkpoint directories, in torchtune's layout, or None.

    ``adapter_model.pt`` (torchtune keys) is preferred; ``adapter_model.safetensors`` (PEFT keys,
    as torchtune also writes it) is converted. ``adapter_config.json`` gives alpha; the rank
    comes from the shapes and must agree with its ``r``.
    """
    directory = Path(directory)
    if not has_adapter(directory):
        return None
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ConversionError(
            f"{directory} has adapter weights but no {ADAPTER_CONFIG} (it gives lora_alpha)."
        )
    try:
        config = json.loads(config_path.read_text())
        alpha = float(config["lora_alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConversionError(f"{config_path} has no usable lora_alpha ({err}).") from err
    if (directory / ADAPTER_PT).is_file():
        source = open_state_dict(directory / ADAPTER_PT)
        weights = {_strip(k, "backbone."): source.get(k) for k in source.keys()}
        bad = next((k for k in weights if not _TUNE_LORA.match(k)), None)
        if bad is not None:
            raise ConversionError(f"{directory / ADAPTER_PT}: {bad!r} is not a torchtune LoRA key.")
        a_keys = [k for k in weights if k.endswith("lora_a.weight")]
        if not a_keys:
            raise ConversionError(f"{directory / ADAPTER_PT} holds no lora_a weights.")
        ranks = {int(weights[k].shape[0]) for k in a_keys}
        if len(ranks) != 1:
            raise ConversionError(f"{directory / ADAPTER_PT}: LoRA ranks differ between modules ({sorted(ranks)}).")
        rank = ranks.pop()
        adapter = TuneAdapter(weights=weights, rank=rank, alpha=alpha)
    else:
        source = open_state_dict(directory / ADAPTER_SAFETENSORS)
        parts = split_peft_keys({_strip(k, PEFT_PREFIX): k for k in source.keys()}, with_base=False)
        if parts.base:
            raise ConversionError(
                f"{directory / ADAPTER_SAFETENSORS}: {next(iter(parts.base.values()))!r} is not a LoRA weight."
            )
        rank = rank_of(parts, source.shape)
        adapter = peft_to_tune_adapter(parts, source.get, layout, rank, alpha)
    if config.get("r") is not None and int(config["r"]) != adapter.rank:
        raise ConversionError(
            f"{config_path} says r={config['r']} but the adapter weights have rank {adapter.rank}."
        )
    adapter.extra_config = {k: v for k, v in config.items() if k not in ("r", "lora_alpha", "target_modules")}
    return adapter


def adapter_files(adapter: TuneAdapter, layout: BackboneLayout) -> Tuple[Dict, Dict, Dict]:
    """What torchtune's HF checkpointer writes for an adapter: (``adapter_model.pt`` dict,
    ``adapter_model.safetensors`` dict in PEFT keys, ``adapter_config.json`` dict)."""
    peft = {PEFT_PREFIX + k: v for k, v in tune_adapter_to_peft(adapter, layout, adapter_name=None).items()}
    return dict(adapter.weights), peft, adapter.config_json()


def write_adapter_files(directory: Path, adapter: TuneAdapter, layout: BackboneLayout) -> None:
    """The adapter files torchtune's HF checkpointer writes for LoRA training."""
    tune_sd, peft_sd, config = adapter_files(adapter, layout)
    torch.save(tune_sd, directory / ADAPTER_PT)
    save_file({k: v.contiguous() for k, v in peft_sd.items()}, str(directory / ADAPTER_SAFETENSORS),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))



def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_PT",
    "ADAPTER_SAFETENSORS",
    "PEFT_PREFIX",
    "PeftParts",
    "TuneAdapter",
    "adapter_files",
    "has_adapter",
    "load_adapter",
    "merge_embedding_lora",
    "merged_hf",
    "peft_to_tune_adapter",
    "rank_of",
    "split_peft_keys",
    "tune_adapter_to_peft",
    "write_adapter_files",
]
