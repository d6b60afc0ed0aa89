"""Documents -> segment windows -> batches, resumable mid-epoch (torchdata's stateful loader)."""

from functools import partial
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, utils
from torchtune.config._utils import _get_component_from_path

from hmt_plugin.modules.hmt_config import HMTConfig

log = utils.get_logger("INFO")


def pad_id_of(tokenizer: Any) -> int:
    """Padding is masked, so any id in the vocabulary will do; SentencePiece's -1 is not."""
    pad = getattr(tokenizer, "pad_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else 0


def build_tokenizer(cfg_tokenizer: Optional[DictConfig]) -> Any:
    """Instantiate the config's tokenizer (None without one). Its files are checked first:
    torchtune's tokenizers report a missing file in their own words (SentencePiece:
    ``NOT_FOUND``), without the config key to change."""
    if not cfg_tokenizer:
        return None
    for key in ("path", "merges_file"):
        value = cfg_tokenizer.get(key)
        if isinstance(value, str) and not Path(value).exists():
            raise FileNotFoundError(
                f"tokenizer.{key}={value!r} does not exist. Point it at the model's tokenizer "
                "file (tokenizer.model for Llama 2 / SentencePiece, tokenizer.model of Llama 3, "
                "vocab.json and merges.txt for Qwen2; the checkpoint directory or its "
                "tokenizer.json for hmt_plugin.data.hf_tokenizer), usually in the checkpoint "
                "directory."
            )
    return config.instantiate(cfg_tokenizer)


def build_documents(
    cfg_dataset: DictConfig, tokenizer: Any, tokens_per_segment: Optional[int] = None
) -> Any:
    """Instantiate the dataset builder of a config (it receives the tokenizer first, as in
    torchtune; synthetic datasets accept ``tokenizer=None``).

    ``tokens_per_segment``: the model's; a dataset laid out in segments of another size
    (``dataset.tokens_per_segment``) is refused rather than trained on with its segments
    cut across."""
    if cfg_dataset is None:
        raise ValueError("the config has no `dataset` section; add one (see configs/tiny/).")
    laid_out = cfg_dataset.get("tokens_per_segment")
    if tokens_per_segment is not None and laid_out is not None and laid_out != tokens_per_segment:
        raise ValueError(
            f"dataset.tokens_per_segment={laid_out} but the model reads {tokens_per_segment} new "
            "tokens per segment (segment_length minus memory and sensory positions); set "
            f"dataset.tokens_per_segment={tokens_per_segment}."
        )
    docs = config.instantiate(cfg_dataset, tokenizer)
    if len(docs) == 0:
        raise ValueError(
            f"dataset {cfg_dataset.get('_component_')} produced no documents (source="
            f"{cfg_dataset.get('source', cfg_dataset.get('path'))!r}); check the path and split."
        )
    return docs


def build_dataloader(
    documents: Any,
    *,
    hmt_config: HMTConfig,
    cfg_windows: Optional[DictConfig],
    collate_fn: str,
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_id: int,
    world_size: int = 1,
    rank: int = 0,
    training: bool = True,
) -> StatefulDataLoader:
    """Windows of ``segments_per_window`` segments (default ``bptt_depth``) over the
    documents, sharded over ranks, batched by the segment collator.

    The windows dataset exposes ``set_epoch`` (its random offsets depend on it); the
    recipe calls it together with the sampler's."""
    from hmt_plugin.data import SegmentWindows

    windows_args = OmegaConf.to_container(cfg_windows, resolve=True) if cfg_windows else {}
    if training and windows_args.get("segments_per_window") is None:
        windows_args["segments_per_window"] = hmt_config.bptt_depth
    windows = SegmentWindows(
        documents, tokens_per_segment=hmt_config.tokens_per_segment, seed=seed, **windows_args
    )
    if len(windows) < world_size * batch_size and training:
        raise ValueError(
            f"{len(windows)} training windows cannot fill one batch of {batch_size} on each of "
            f"{world_size} rank(s); lower batch_size or nproc_per_node, or add data."
        )
    sampler = StatefulDistributedSampler(
        windows, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    collate_kwargs = {"tokens_per_segment": hmt_config.tokens_per_segment, "pad_id": pad_id}
    if training:
        # Equal widths on every rank: FSDP needs the same number of backbone calls per step.
        collate_kwargs["min_segments"] = windows_args["segments_per_window"]
    collate = partial(_get_component_from_path(collate_fn), **collate_kwargs)
    return StatefulDataLoader(
        windows,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=training,
    )


def build_training_dataloader(
    cfg: DictConfig, tokenizer: Any, hmt_config: HMTConfig, seed: int, *, world_size: int = 1, rank: int = 0
) -> StatefulDataLoader:
    """A fine-tuning recipe's data: the documents of ``cfg.dataset`` laid out in the model's
    segments, in windows (``cfg.windows``) batched by ``cfg.collate_fn`` (default
    :func:`~hmt_plugin.data.segment_collate`), this rank's share of them."""
    documents = build_documents(
        cfg.dataset, tokenizer, tokens_per_segment=hmt_config.tokens_per_segment
    )
    return build_dataloader(
        documents,
        hmt_config=hmt_config,
        cfg_windows=cfg.get("windows"),
        collate_fn=cfg.get("collate_fn", "hmt_plugin.data.segment_collate"),
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        seed=seed,
        pad_id=pad_id_of(tokenizer),
        world_size=world_size,
        rank=rank,
    )


def steps_per_epoch(num_batches: int, grad_accum: int, max_steps: Optional[int]) -> int:
    """Optimizer steps in one epoch of ``num_batches`` batches (per rank)."""
    steps = num_batches // grad_accum
    if max_steps is not None:
        steps = min(steps, max_steps)
    if steps < 1:
        raise ValueError(
            f"one epoch has {num_batches} batches (per rank), fewer than "
            f"gradient_accumulation_steps={grad_accum}; add data or lower it."
        )
    return steps
