"""Checks a recipe config before anything is built: misspelled keys, missing sections,
component arguments the component does not take — each named, with the likely fix."""

import difflib
import inspect
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig
from torchtune.config._utils import _get_component_from_path

FINETUNE_KEYS = {
    "output_dir", "seed", "device", "dtype", "model", "tokenizer", "checkpointer",
    "hmt_checkpoint", "resume_from_checkpoint", "dataset", "windows", "collate_fn", "shuffle",
    "batch_size", "loss_scope", "optimizer", "lr_scheduler", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "clip_grad_norm", "compile", "enable_activation_checkpointing",
    "metric_logger", "log_every_n_steps", "log_peak_memory_stats", "save_every_n_steps",
    "keep_last_n_checkpoints", "profiler", "validation", "fsdp_cpu_offload",
    "fsdp_reshard_after_forward", "distributed_timeout_s", "log_all_segments",
    "segment_checkpointing", "hmt_lr",
}
# Top-level keys ending in `_dir` are path variables for `${...}` interpolation
# (model_dir, backbone_dir, stage1_dir, ...).
PATH_VARIABLE_SUFFIX = "_dir"
FINETUNE_REQUIRED = {
    "output_dir", "model", "checkpointer", "dataset", "optimizer", "batch_size", "epochs",
    "gradient_accumulation_steps", "metric_logger", "device", "dtype", "seed",
}
WINDOW_KEYS = {"segments_per_window", "stride", "random_offset", "max_tokens"}


class ConfigError(ValueError):
    """A config that cannot run. The message names the key and the fix."""


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _suggest_path(path: str) -> str:
    """A did-you-mean for a misspelled dotted path, from the names that exist in its longest
    importable prefix (empty if nothing is close)."""
    import importlib

    parts = str(path).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except Exception:
            continue
        close = difflib.get_close_matches(parts[cut], dir(module), n=1, cutoff=0.6)
        if close:
            return f" Did you mean {'.'.join(parts[:cut] + [close[0]] + parts[cut + 1:])!r}?"
        return ""
    return ""


def check_keys(node: Any, known: Iterable[str], where: str, path_variables: bool = False) -> None:
    known = set(known)
    for key in node.keys():
        if path_variables and str(key).endswith(PATH_VARIABLE_SUFFIX):
            continue
        if key not in known:
            raise ConfigError(
                f"unknown config key {where}{key!r}.{_suggest(key, known)} Known keys: "
                f"{', '.join(sorted(known))}."
            )


def check_component_args(node: Any, where: str) -> None:
    """Every ``_component_`` node's keys must be arguments of the component (unless it takes
    ``**kwargs``); nested nodes (e.g. ``model.backbone``) are checked too."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_component_args(item, f"{where}[{i}].")
        return
    if not isinstance(node, DictConfig):
        return
    if "_component_" in node:
        path = node["_component_"]
        try:
            component = _get_component_from_path(path)
        except Exception as err:
            raise ConfigError(
                f"{where}_component_={path!r} cannot be imported ({err}).{_suggest_path(path)}"
            ) from err
        try:
            params = inspect.signature(component).parameters
        except (TypeError, ValueError):
            params = None
        if params is not None and "hmt_settings" in params:
            # Our named builders forward **hmt_settings to hmt_plugin.models.hmt.
            from hmt_plugin.models import hmt as hmt_builder

            params = {**params, **inspect.signature(hmt_builder).parameters}
            params.pop("hmt_settings")
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = {n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL}
            for key in node.keys():
                if key != "_component_" and key not in accepted:
                    raise ConfigError(
                        f"{where}{key!r} is not an argument of {path}.{_suggest(key, accepted)} "
                        f"It takes: {', '.join(sorted(accepted))}."
                    )
    for key, value in node.items():
        if key != "_component_":
            check_component_args(value, f"{where}{key}.")


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def validate_finetune_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found in a fine-tuning config."""
    check_keys(cfg, FINETUNE_KEYS, "", path_variables=True)
    missing = sorted(k for k in FINETUNE_REQUIRED if cfg.get(k) is None)
    if missing:
        raise ConfigError(
            f"the config lacks {missing}; copy a complete config with `hmt-tune cp` and edit it."
        )
    if cfg.get("windows") is not None:
        check_keys(cfg.windows, WINDOW_KEYS, "windows.")
    scope = cfg.get("loss_scope", "last")
    if scope not in ("last", "all"):
        raise ConfigError(f"loss_scope={scope!r}: use 'last' (the published loss) or 'all'.")
    for key in ("batch_size", "epochs", "gradient_accumulation_steps"):
        value = cfg.get(key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be an integer >= 1.")
    for key in ("max_steps_per_epoch", "log_every_n_steps", "save_every_n_steps",
                "keep_last_n_checkpoints"):
        # null means "no limit" / "never" / "keep all"; 0 would divide by zero or stop the
        # run before its first step with a message about something else.
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r} must be an integer >= 1, or null.")
    lr = cfg.optimizer.get("lr") if isinstance(cfg.get("optimizer"), DictConfig) else None
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
        # Optimizers compare lr with 0 and fail with a bare TypeError on a string.
        raise ConfigError(f"optimizer.lr={lr!r} must be a number, e.g. 3.0e-4.")
    hmt_lr = cfg.get("hmt_lr")
    if hmt_lr is not None and not _positive_number(hmt_lr):
        raise ConfigError(
            f"hmt_lr={hmt_lr!r} must be a number > 0 (the learning rate of the HMT parameters, "
            "e.g. 1.0e-3), or null for optimizer.lr."
        )
    timeout = cfg.get("distributed_timeout_s")
    if timeout is not None and not _positive_number(timeout):
        raise ConfigError(
            f"distributed_timeout_s={timeout!r} must be a number of seconds > 0 (how long a "
            "rank waits for the others before failing)."
        )
    for key in ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "lr_scheduler",
                "metric_logger", "profiler"):
        if cfg.get(key) is not None:
            check_component_args(cfg[key], f"{key}.")
    if cfg.get("validation") is not None:
        check_keys(cfg.validation, {"dataset", "modes", "batch_size", "max_tokens"}, "validation.")
        check_component_args(cfg.validation.dataset, "validation.dataset.")
    loss_options(cfg)


def loss_options(cfg: DictConfig) -> "LossOptions":
    """The loss options a fine-tuning config sets:

    * ``log_all_segments`` (default true): log ``ppl_all_segments``. With ``loss_scope: last``
      its NLL (the earlier segments') is computed only on the steps that are logged
      (``log_every_n_steps``); false never computes it (same loss and gradients either way).
    * ``segment_checkpointing`` (default false): recompute each segment's backbone call in
      backward, so activation memory grows by a few vectors per segment of ``bptt_depth``
      instead of every layer's activations (about 40% more time per step). Same loss and
      gradients.
    """
    values = {}
    for key, default in (("log_all_segments", True), ("segment_checkpointing", False)):
        value = cfg.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false.")
        values[key] = value
    if values["segment_checkpointing"] and cfg.get("enable_activation_checkpointing", False):
        raise ConfigError(
            "segment_checkpointing and enable_activation_checkpointing are both true: each "
            "recomputes the backbone in backward, together twice. Keep one (segment_checkpointing "
            "also covers the loss head)."
        )
    from hmt_plugin.training.loss import LossOptions

    return LossOptions(log_all_segments=values["log_all_segments"],
                       checkpoint_segments=values["segment_checkpointing"],
                       log_every_n_steps=cfg.get("log_every_n_steps") or 1)


def validate_config_file(cfg: DictConfig) -> None:
    """``hmt-tune validate``: the checks of the recipe the config is for (fine-tuning, eval or
    generation, told apart by their keys), which include component arguments."""
    if "optimizer" in cfg:
        validate_finetune_config(cfg)
    elif any(k in cfg for k in ("context_lengths", "modes", "runs", "lm_eval")):
        from hmt_plugin.recipes.hmt_eval import validate_eval_config

        validate_eval_config(cfg)
    elif any(k in cfg for k in ("prompt", "prompt_file", "max_new_tokens")):
        from hmt_plugin.recipes.hmt_generate import validate_generate_config

        validate_generate_config(cfg)
    for key, value in cfg.items():
        check_component_args(value, f"{key}.")
