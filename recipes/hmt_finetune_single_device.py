"""Fine-tune a Hierarchical Memory Transformer on one device (CPU, one GPU), LoRA or full.

    hmt-tune run hmt_finetune_single_device --config tiny/hmt_demo_cpu
    tune run <copied recipe>.py --config <copied config>.yaml

Reuses torchtune for everything that is not HMT: config instantiation, checkpointers,
LoRA utilities, optimizers and LR schedulers, gradient accumulation and clipping,
activation checkpointing, compile, metric loggers and the profiler. What HMT adds:

* the batch is a window of ``bptt_depth`` segments per document, read by the model with
  memory carried between segments; the loss covers the last segment or every segment
  (``loss_scope``), and both perplexities are logged;
* checkpoints hold the HMT parameters in their own file beside the backbone, every
  ``save_every_n_steps`` optimizer steps, written atomically; ``resume_from_checkpoint``
  continues from the newest complete one exactly where it stopped (data position, LR
  schedule, optimizer, RNG);
* two-stage training: a stage-2 config points ``hmt_checkpoint`` (and the checkpointer) at
  the stage-1 run's ``final`` checkpoint.
"""

import sys
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface

from hmt_plugin.training.data_setup import (
    build_tokenizer,
    build_training_dataloader,
    steps_per_epoch,
)
from hmt_plugin.training.loss import batch_loss
from hmt_plugin.training.model_setup import (
    cpu_state_dict,
    load_initial_state,
    lora_settings,
    optimizer_params,
    set_trainable,
    starting_state_dict,
)
from hmt_plugin.training.recipe_main import run_recipe
from hmt_plugin.training.run_config import validate_finetune_config
from hmt_plugin.training.train_loop import HMTTrainingLoop
from hmt_plugin.training.validation import run_validation

log = utils.get_logger("INFO")


class HMTFinetuneRecipeSingleDevice(HMTTrainingLoop, FTRecipeInterface):
    """HMT fine-tuning on a single device. See the module docstring and
    ``configs/tiny/hmt_demo_cpu.yaml`` for every option."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_finetune_config(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._read_loop_settings(cfg)
        self._loss_fn = batch_loss
        self.seed = training.set_seed(seed=cfg.seed)

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        resume_from, recipe_state = self._setup_checkpointing(cfg)
        self._model = self._setup_model(cfg, resume_from)
        self._check_resume(cfg, resume_from, recipe_state)
        self._tokenizer = build_tokenizer(cfg.get("tokenizer"))

        self._optimizer = config.instantiate(
            cfg.optimizer, optimizer_params(self._model, cfg.get("hmt_lr"))
        )
        self._dataloader = build_training_dataloader(
            cfg, self._tokenizer, self._model.config, self.seed
        )
        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader), self._grad_accum, self.max_steps_per_epoch
        )
        total_steps = self.total_epochs * self._steps_per_epoch
        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self._optimizer, num_training_steps=total_steps
        ) if cfg.get("lr_scheduler") else None

        if recipe_state is not None:
            self._restore(recipe_state)
        self._profiler = training.DummyProfiler()
        if cfg.get("profiler"):
            # torchtune's setup_torch_profiler returns (profiler, its resolved config).
            self._profiler, _ = config.instantiate(cfg.profiler)
        self._validation_cfg = cfg.get("validation")
        self._cfg = cfg

    def _setup_model(self, cfg: DictConfig, resume_from) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg.model)
        lora = lora_settings(model)
        full = starting_state_dict(
            model, self._checkpointer, cfg.checkpointer, lora=lora, seed=self.seed,
            resume_from=resume_from, hmt_checkpoint=cfg.get("hmt_checkpoint"),
        )
        load_initial_state(model, full, lora)
        trainable = set_trainable(model, lora)
        self._lora = lora
        if cfg.get("compile", False):
            training.compile_model(model)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        n_train = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
        n_hmt = sum(p.numel() for p in model.hmt_state_dict().values())
        n_all = sum(p.numel() for p in model.parameters())
        log.info(
            f"HMT model ({model.config.mode}, {'LoRA' if lora else 'full fine-tune'}, "
            f"{self._dtype}): {n_all:,} parameters, {n_hmt:,} HMT ({100 * n_hmt / n_all:.2f}%), "
            f"{n_train:,} trainable; {model.config.tokens_per_segment} new tokens per segment."
        )
        return model

    def _restore(self, state: Dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state["optimizer"])
        if self._lr_scheduler is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._dataloader.load_state_dict(state["dataloader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, final: bool = False) -> None:
        """A step checkpoint (resumable), or the final one (LoRA merged, no training state)."""
        full = cpu_state_dict(self._model)
        recipe_state = None
        if not final:
            rng = {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
            recipe_state = self._recipe_state(
                self._optimizer.state_dict(), self._dataloader.state_dict(), rng
            )
        self._write_checkpoint(full, recipe_state, final)

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        self._model.train()
        with self._profiler as profiler:
            self._train_epochs(profiler)
        self.save_checkpoint(final=True)
        if self._validation_cfg:
            run_validation(self._model, self._validation_cfg, self._tokenizer, self._metric_logger,
                           self._device, self._output_dir, step=self.global_step)

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(HMTFinetuneRecipeSingleDevice, cfg, "train")


if __name__ == "__main__":
    sys.exit(recipe_main())
