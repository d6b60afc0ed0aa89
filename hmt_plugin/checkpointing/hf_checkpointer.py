"""torchtune's ``FullModelHFCheckpointer`` configured from the checkpoint directory itself, so a
config names the model once (``${backbone_dir}``)::

    checkpointer:
      _component_: hmt_plugin.checkpointing.hf_checkpointer
      checkpoint_dir: ${backbone_dir}
      output_dir: ${output_dir}
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from torchtune.training import FullModelHFCheckpointer

from hmt_plugin.checkpointing.hf_backbone import checkpointer_model_type

# What an HF directory holds its weights in, in the order they are looked for: an index
# naming the shards, else the single file.
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_weight_files(checkpoint_dir: Union[str, Path]) -> List[str]:
    """The weight files of an HF checkpoint directory: the shards its index names, or its one
    ``model.safetensors`` / ``pytorch_model.bin``.

    Raises:
        FileNotFoundError: when the directory holds none of them, naming what it looked for.
    """
    directory = Path(checkpoint_dir)
    for name in _INDEXES:
        index = directory / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{index} has no readable weight_map ({err!r}); the download is damaged."
                ) from err
            return sorted(set(weight_map.values()))
    for name in _SINGLE_FILES:
        if (directory / name).is_file():
            return [name]
    raise FileNotFoundError(
        f"{directory} holds no model weights: looked for {', '.join(_INDEXES + _SINGLE_FILES)}. "
        "Point checkpoint_dir at the downloaded model directory, or list its weight files in "
        "checkpointer.checkpoint_files."
    )


def hf_checkpointer(
    checkpoint_dir: Union[str, Path],
    output_dir: Union[str, Path],
    *,
    checkpoint_files: Optional[Union[List[str], Dict[str, str]]] = None,
    recipe_checkpoint: Optional[str] = None,
    adapter_checkpoint: Optional[str] = None,
    resume_from_checkpoint: bool = False,
    **kwargs: Any,
) -> FullModelHFCheckpointer:
    """torchtune's HF checkpointer with ``model_type`` read from ``config.json`` (see
    :data:`~hmt_plugin.checkpointing.hf_backbone.CHECKPOINTER_MODEL_TYPES`) and
    ``checkpoint_files`` defaulting to the directory's weights (:func:`hf_weight_files`).

    The recipes re-point it at their own checkpoints (a full fine-tune's step directory, stage
    1's ``final``): those hold the ``config.json`` torchtune copied and an index of the shards
    it wrote, so the same defaults find them. Other keyword arguments (``model_type`` to
    override, ``safe_serialization``, ``should_load_recipe_state``) go to the checkpointer.
    """
    model_type = kwargs.pop("model_type", None) or checkpointer_model_type(checkpoint_dir)
    if not checkpoint_files:
        files = hf_weight_files(checkpoint_dir)
    elif isinstance(checkpoint_files, Mapping):  # torchtune's {filename_format, max_filename}
        files = dict(checkpoint_files)
    else:
        files = list(checkpoint_files)
    return FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=files,
        model_type=model_type,
        output_dir=str(output_dir),
        recipe_checkpoint=recipe_checkpoint,
        adapter_checkpoint=adapter_checkpoint,
        resume_from_checkpoint=resume_from_checkpoint,
        **kwargs,
    )
