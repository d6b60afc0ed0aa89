"""The HMT part of the fine-tuning recipes, shared by ``hmt_finetune_single_device`` and
``hmt_finetune_distributed``. The recipes keep torchtune's skeleton (``__init__``, ``setup``,
``train``, ``save_checkpoint``, ``cleanup``, copied as torchtune copies it between its
recipes) and inherit from :class:`HMTTrainingLoop` what is HMT's: where a run resumes, the
recipe state of a step checkpoint, the epochs of segment windows and the optimizer step.
"""

import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch.distributed.tensor import DTensor
from torchtune import training, utils
from tqdm import tqdm

from hmt_plugin.checkpointing import step_checkpoints as ckpt
from hmt_plugin.training.loss import LossAccumulator
from hmt_plugin.training.model_setup import build_checkpointer, checkpoint_parts
from hmt_plugin.training.run_config import loss_options

log = utils.get_logger("INFO")


class HMTTrainingLoop:
    """Training steps of an HMT fine-tuning recipe.

    A recipe calls :meth:`_read_loop_settings` in ``__init__`` and sets (torchtune's names)
    ``_loss_fn`` (:func:`~hmt_plugin.training.loss.batch_loss`), ``_device`` and ``seed``
    there; in ``setup`` it calls :meth:`_setup_checkpointing`, builds ``_model`` (and
    ``_lora``), calls :meth:`_check_resume` and sets ``_optimizer``, ``_lr_scheduler`` (or
    None), ``_dataloader``, ``_steps_per_epoch`` and ``_metric_logger``; it defines
    ``save_checkpoint()``.

    One device needs nothing else. A distributed recipe sets ``world_size`` and
    ``_is_rank_zero`` and ``_reduce_over_ranks = True``: a step's loss sums are then added up
    over the ranks, and its loss is normalised by the targets of all ranks.
    """

    world_size: int = 1
    _is_rank_zero: bool = True
    _reduce_over_ranks: bool = False

    def _read_loop_settings(self, cfg: Any) -> None:
        """The training settings of the config, under the names the loop reads them by; the
        run starts at step 0 of epoch 0 (:meth:`_load_resume_point` moves it)."""
        self._output_dir = cfg.output_dir
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._save_every_n_steps = cfg.get("save_every_n_steps")
        self._log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)
        self._grad_accum = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm")
        self._loss_scope = cfg.get("loss_scope", "last")
        self._loss_options = loss_options(cfg)
        self._resume = cfg.get("resume_from_checkpoint", False)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self.global_step = 0
        self.epoch = 0

    # ------------------------------------------------------------------ resume
    def _setup_checkpointing(self, cfg: Any) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
        """The backbone's checkpointer, the writer of this run's checkpoints, and the step
        checkpoint to resume from with its recipe state (both None for a fresh run); the
        run's seed and position are set from it."""
        resume_from = ckpt.resume_point(self._output_dir, self._resume)
        recipe_state = None
        if resume_from is not None:
            utils.log_rank_zero(log, f"Resuming from {resume_from}")
            recipe_state = ckpt.load_recipe_state(resume_from)
            self.seed = recipe_state["seed"]
            self.global_step = recipe_state["global_step"]
            self.epoch = recipe_state["epoch"]
        self._checkpointer = build_checkpointer(
            cfg.checkpointer, cfg.get("hmt_checkpoint"), should_load_recipe_state=False
        )
        self._writer = ckpt.CheckpointWriter(
            self._checkpointer, self._output_dir, keep_last_n=cfg.get("keep_last_n_checkpoints")
        )
        return resume_from, recipe_state

    def _check_resume(
        self, cfg: Any, resume_from: Optional[Path], recipe_state: Optional[Dict[str, Any]]
    ) -> None:
        """Record the settings a resume of this run must keep (once the model is built), and
        refuse to resume ``resume_from`` with others."""
        self._resume_settings = ckpt.resume_settings(cfg, self._model.config, self.world_size)
        if recipe_state is not None:
            ckpt.check_resume(recipe_state, self._resume_settings, resume_from)

    def _recipe_state(self, optimizer: Any, dataloader: Any, rng: Any) -> Dict[str, Any]:
        """What a step checkpoint holds to resume exactly where it stopped, with the
        optimizer, data-loader and RNG states as the recipe gathers them (per rank when
        distributed)."""
        return {
            "seed": self.seed,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "settings": self._resume_settings,
            "optimizer": optimizer,
            "lr_scheduler": self._lr_scheduler.state_dict() if self._lr_scheduler else None,
            "dataloader": dataloader,
            "rng": rng,
        }

    def _write_checkpoint(
        self, full_state: Dict[str, torch.Tensor], recipe_state: Optional[Dict[str, Any]],
        final: bool, **meta: Any,
    ) -> None:
        """Write a step checkpoint (``recipe_state`` given) or the final one from a full CPU
        state dict of the model (its own copy: LoRA is merged into it in place)."""
        parts = checkpoint_parts(full_state, self._lora, final=final)
        name = ckpt.FINAL if final else ckpt.step_dir_name(self.global_step)
        path = self._writer.save(
            name,
            hmt_config=self._model.config,
            recipe_state=recipe_state,
            meta={"step": self.global_step, "epoch": self.epoch, "final": final, **meta},
            **parts,
        )
        log.info(f"Checkpoint written to {path}")

    # ------------------------------------------------------------------ training
    def _train_epochs(self, profiler: Any) -> None:
        """Epochs of segment windows from the current position: a backward pass per
        micro-batch, an optimizer step every ``gradient_accumulation_steps`` of them, logs
        and step checkpoints on their schedules."""
        sums = LossAccumulator()
        t0 = time.perf_counter()
        steps_done_in_epoch = self.global_step - self.epoch * self._steps_per_epoch
        while self.epoch < self.total_epochs:
            self._dataloader.sampler.set_epoch(self.epoch)
            self._dataloader.dataset.set_epoch(self.epoch)
            pbar = tqdm(total=self._steps_per_epoch, initial=steps_done_in_epoch,
                        disable=not self._is_rank_zero or None)
            for idx, batch in enumerate(self._dataloader):
                if steps_done_in_epoch >= self._steps_per_epoch:
                    break
                loss = self._loss_fn(self._model, batch, self._device, self._loss_scope,
                                     **self._loss_options.for_step(self.global_step + 1))
                loss.loss_sum.backward()
                sums.add(loss)
                if (idx + 1) % self._grad_accum != 0:
                    continue
                metrics = self._optimizer_step(sums, time.perf_counter() - t0)
                steps_done_in_epoch += 1
                pbar.update(1)
                pbar.set_description(f"{self.epoch + 1}|{self.global_step}|loss {metrics['loss']:.4f}")
                if self._is_rank_zero and self.global_step % self._log_every_n_steps == 0:
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
        """One optimizer step over the accumulated micro-batches; returns the step's metrics.

        Raises:
            FloatingPointError: a NaN/inf loss, before the step writes it into the weights.
        """
        if self._reduce_over_ranks:
            sums.all_reduce()
        metrics = sums.metrics(elapsed, self.world_size)
        ckpt.check_finite_loss(metrics["loss"], self.global_step + 1, self._output_dir)
        # The loss is a sum over all ranks' targets, and FSDP averages gradients over ranks.
        training.scale_grads(self._model, self.world_size / sums.num_tokens)
        if self._clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self._model.parameters(), max_norm=float(self._clip_grad_norm)
            )
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            metrics["grad_norm"] = float(grad_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        self.global_step += 1
        groups = self._optimizer.param_groups
        metrics["lr"] = groups[0]["lr"]
        if len(groups) > 1:  # hmt_lr: the HMT parameters' group
            metrics["hmt_lr"] = groups[1]["lr"]
        if self._device.type == "cuda" and self._log_peak_memory_stats:
            metrics.update(training.get_memory_stats(device=self._device))
        return metrics
