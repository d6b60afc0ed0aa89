"""Our checkpoint directories exported as plain Hugging Face directories: the LoRA adapter (if
any) merged into the backbone, written shard by shard, with ``config.json``, the tokenizer and
the other small files, and our HMT files beside."""

from pathlib import Path
from typing import Union

from hmt_plugin.checkpointing.hmt_files import HMT_CONFIG, copy_hmt_files, open_our_checkpoint
from hmt_plugin.checkpointing.io import (
    DEFAULT_MAX_SHARD_SIZE,
    ConversionResult,
    PathLike,
    ShardWriter,
    copy_side_files,
    progress,
    staged_directory,
)
from hmt_plugin.checkpointing.meta import META_PARAMS
from hmt_plugin.checkpointing.peft_keys import ADAPTER_CONFIG, merged_hf


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
    ours = open_our_checkpoint(checkpoint_dir)
    result = ConversionResult(Path(output_dir))
    if ours.adapter is not None:
        result.note(f"LoRA adapter (r={ours.adapter.rank}, alpha={ours.adapter.alpha}) merged.")
    with staged_directory(output_dir, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        keys = ours.layout.ordered(ours.backbone.keys())
        for key in progress(keys, desc="export-hf", enabled=show_progress):
            writer.add(key, merged_hf(key, ours.backbone.get(key), ours.adapter, ours.layout))
        writer.close()
        copy_side_files(ours.directory, stage, skip=(HMT_CONFIG, ADAPTER_CONFIG, META_PARAMS))
        copy_hmt_files(ours.directory, stage)
    return result
