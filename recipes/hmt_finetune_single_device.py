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
import time
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface
from tqdm import tqdm

from hmt_plugin.checkpointing import step_checkpoints as ckpt
from hmt_plugin.training.data_setup import (
    build_dataloader,
    build_documents,
    build_tokenizer,
    pad_id_of,
    steps_per_epoch,
)
from hmt_plugin.training.loss import LossAccumulator, batch_loss
from hmt_plugin.training.model_setup import (
    build_checkpointer,
    checkpoint_parts,
    cpu_state_dict,
    initial_state_dict,
    load_backbone,
    load_initial_state,
    lora_settings,
    set_trainable,
)
from hmt_plugin.training.run_config import loss_options, validate_finetune_config
from hmt_plugin.training.validation import run_validation

log = utils.get_logger("INFO")


class HMTFinetuneRecipeSingleDevice(FTRecipeInterface):
    """HMT fine-tuning on a single device. See the module docstring and
    ``configs/tiny/hmt_demo_cpu.yaml`` for every option."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_finetune_config(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._save_every_n_steps = cfg.get("save_every_n_steps")
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm")
        self._loss_scope = cfg.get("loss_scope", "last")
        self._loss_options = loss_options(cfg)
        self._resume = cfg.get("resume_from_checkpoint", False)
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self.global_step = 0
        self.epoch = 0

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        resume_from = ckpt.resume_point(self._output_dir, self._resume)
        if resume_from is not None:
            log.info(f"Resuming from {resume_from}")
        recipe_state = ckpt.load_recipe_state(resume_from) if resume_from else None
        if recipe_state is not None:
            self.seed = recipe_state["seed"]
            self.global_step = recipe_state["global_step"]
            self.epoch = recipe_state["epoch"]

        self._checkpointer = build_checkpointer(
            cfg.checkpointer, cfg.get("hmt_checkpoint"), should_load_recipe_state=False
        )
        self._writer = ckpt.CheckpointWriter(
            self._checkpointer, self._output_dir, keep_last_n=cfg.get("keep_last_n_checkpoints")
        )
        self._model = self._setup_model(cfg, resume_from)
        self._resume_settings = ckpt.resume_settings(cfg, self._model.config, 1)
        if recipe_state is not None:
            ckpt.check_resume(recipe_state, self._resume_settings, resume_from)
        self._tokenizer = build_tokenizer(cfg.get("tokenizer"))

        self._optimizer = config.instantiate(
            cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad]
        )
        documents = build_documents(
            cfg.dataset, self._tokenizer, tokens_per_segment=self._model.config.tokens_per_segment
        )
        self._dataloader = build_dataloader(
            documents,
            hmt_config=self._model.config,
            cfg_windows=cfg.get("windows"),
            collate_fn=cfg.get("collate_fn", "hmt_plugin.data.segment_collate"),
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            seed=self.seed,
            pad_id=pad_id_of(self._tokenizer),
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
        base_state = load_backbone(self._checkpointer)
        adapter_state = None
        if resume_from is not None:
            if lora is None:
                # Full fine-tune: the step checkpoint holds the whole backbone.
                resumed = build_checkpointer(
                    cfg.checkpointer,
                    checkpoint_dir=str(resume_from),
                    checkpoint_files=sorted(p.name for p in resume_from.glob("model-*.safetensors")),
                    should_load_recipe_state=False,
                )
                base_state = load_backbone(resumed)
            else:
                adapter_state = torch.load(
                    resume_from / "adapter_model.pt", map_location="cpu", weights_only=True
                )
        hmt_source = resume_from if resume_from is not None else cfg.get("hmt_checkpoint")
        full = initial_state_dict(
            model, base_state, lora=lora, seed=self.seed, adapter_state=adapter_state,
            hmt_checkpoint=hmt_source,
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
        parts = checkpoint_parts(cpu_state_dict(self._model), self._lora, final=final)
        recipe_state = None
        if not final:
            recipe_state = {
                "seed": self.seed,
                "global_step": self.global_step,
                "epoch": self.epoch,
                "settings": self._resume_settings,
                "optimizer": self._optimizer.state_dict(),
                "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler else None,
                "dataloader": self._dataloader.state_dict(),
                "rng": {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            }
        name = ckpt.FINAL if final else ckpt.step_dir_name(self.global_step)
        path = self._writer.save(
            name,
            hmt_config=self._model.config,
            recipe_state=recipe_state,
            meta={"step": self.global_step, "epoch": self.epoch, "final": final},
            **parts,
        )
        log.info(f"Checkpoint written to {path}")

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        self._model.train()
        with self._profiler as profiler:
            self._train_epochs(profiler)
        self.save_checkpoint(final=True)
        if self._validation_cfg:
            run_validation(self._model, self._validation_cfg, self._tokenizer, self._metric_logger,
                           self._device, self._output_dir, step=self.global_step)

    def _train_epochs(self, profiler) -> None:
        sums = LossAccumulator()
        t0 = time.perf_counter()
        steps_done_in_epoch = self.global_step - self.epoch * self._steps_per_epoch
        while self.epoch < self.total_epochs:
            self._dataloader.sampler.set_epoch(self.epoch)
            self._dataloader.dataset.set_epoch(self.epoch)
            pbar = tqdm(total=self._steps_per_epoch, initial=steps_done_in_epoch, disable=None)
            for idx, batch in enumerate(self._dataloader):
                if steps_done_in_epoch >= self._steps_per_epoch:
                    break
                loss = batch_loss(self._model, batch, self._device, self._loss_scope,
                                  **self._loss_options.for_step(self.global_step + 1))
                loss.loss_sum.backward()
                sums.add(loss)
                if (idx + 1) % self._grad_accum != 0:
                    continue
                metrics = self._optimizer_step(sums, time.perf_counter() - t0)
                steps_done_in_epoch += 1
                pbar.update(1)
                pbar.set_description(f"{self.epoch + 1}|{self.global_step}|loss {metrics['loss']:.4f}")
                if self.global_step % self._log_every_n_steps == 0:
                    self._metric_logger.log_dict(metrics, step=self.global_step)
                profiler.step()
                if self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint()
                sums = LossAccumulator()
                t0 = time.perf_counter()
            pbar.close()
            # Micro-batches left over at the end of an epoch do not leak into the next step.
            self._optimizer.zero_grad(set_to_none=True)
            sums = LossAccumulator()
            self.epoch += 1
            steps_done_in_epoch = 0

    def _optimizer_step(self, sums: LossAccumulator, elapsed: float) -> Dict[str, float]:
        metrics = sums.metrics(elapsed)
        ckpt.check_finite_loss(metrics["loss"], self.global_step + 1, self._output_dir)
        training.scale_grads(self._model, 1 / sums.num_tokens)
        if self._clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self._model.parameters(), max_norm=float(self._clip_grad_norm)
            )
            metrics["grad_norm"] = float(grad_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        self.global_step += 1
        metrics["lr"] = self._optimizer.param_groups[0]["lr"]
        if self._device.type == "cuda" and self._log_peak_memory_stats:
            metrics.update(training.get_memory_stats(device=self._device))
        return metrics

    def cleanup(self) -> None:
        self._metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="HMTFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = HMTFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
