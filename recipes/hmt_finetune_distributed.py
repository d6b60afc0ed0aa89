"""Fine-tune a Hierarchical Memory Transformer on several devices with FSDP2, LoRA or full.

    hmt-tune run --nproc_per_node 2 hmt_finetune_distributed --config tiny/hmt_lora_cpu
    hmt-tune run --nnodes 2 --nproc_per_node 8 --rdzv_endpoint host:29500 \\
        hmt_finetune_distributed --config llama2_7b/hmt_lora_pg19

NCCL on GPUs, gloo on CPU. The HMT wrapper is the root FSDP unit and every decoder layer is
sharded inside it: HMT calls the backbone's embedding and layers several times per step
(a batched representation pass, then one pass per segment), and sharding the backbone
alone as the root leaves the wrapper holding plain tensors beside DTensors.

The model is built on the meta device; rank 0's checkpoint weights, the LoRA adapters and
the HMT parameters (drawn the same way as on one device, from ``seed``) are loaded into the
shards. With the same global batch (``batch_size * nproc_per_node``) a run computes the
same losses as ``hmt_finetune_single_device``: the loss of a step is normalised by the
number of targets over all ranks.

Everything else (checkpoints, resume, two stages, validation) is as in the single-device
recipe; only rank 0 writes.
"""

import sys
from datetime import timedelta
from functools import partial
from typing import Any, Dict

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config, modules, training, utils
from torchtune.recipe_interfaces import FTRecipeInterface

from hmt_plugin.checkpointing import step_checkpoints as ckpt
from hmt_plugin.training import faults
from hmt_plugin.training.data_setup import (
    build_tokenizer,
    build_training_dataloader,
    steps_per_epoch,
)
from hmt_plugin.training.loss import batch_loss
from hmt_plugin.training.model_setup import (
    lora_settings,
    optimizer_params,
    set_trainable,
    starting_state_dict,
)
from hmt_plugin.training.run_config import validate_finetune_config
from hmt_plugin.training.train_loop import HMTTrainingLoop
from hmt_plugin.training.validation import run_validation

log = utils.get_logger("INFO")


class HMTFinetuneRecipeDistributed(HMTTrainingLoop, FTRecipeInterface):
    """HMT fine-tuning with FSDP2. See the module docstring."""

    _reduce_over_ranks = True

    def __init__(self, cfg: DictConfig) -> None:
        validate_finetune_config(cfg)
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self._read_loop_settings(cfg)
        self._loss_fn = batch_loss
        self._cpu_offload = cfg.get("fsdp_cpu_offload", False)
        # One seed for every rank: the model and the data order must agree across ranks.
        self.seed = training.set_seed(seed=cfg.seed)

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:
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
            cfg, self._tokenizer, self._model.config, self.seed,
            world_size=self.world_size, rank=self.rank,
        )
        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader), self._grad_accum, self.max_steps_per_epoch
        )
        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler,
            self._optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
        ) if cfg.get("lr_scheduler") else None
        if recipe_state is not None:
            self._restore(recipe_state)
        self._profiler = training.DummyProfiler()
        if cfg.get("profiler") and self._is_rank_zero:
            self._profiler, _ = config.instantiate(cfg.profiler)
        self._validation_cfg = cfg.get("validation")

    def _setup_model(self, cfg: DictConfig, resume_from) -> torch.nn.Module:
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg.model)
        lora = lora_settings(model)
        if lora is not None and lora["is_dora"]:
            raise ValueError("DoRA is not supported by the distributed HMT recipe; use LoRA.")
        self._lora = lora
        set_trainable(model, lora)
        if cfg.get("compile", False):
            training.compile_model(model, verbose=self._is_rank_zero)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions, names_to_match=None)],
            cpu_offload=self._cpu_offload,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
        )

        full = starting_state_dict(
            model, self._checkpointer, cfg.checkpointer, lora=lora, seed=self.seed,
            resume_from=resume_from, hmt_checkpoint=cfg.get("hmt_checkpoint"),
        )
        training.load_from_full_model_state_dict(
            model, full, self._device, strict=True, cpu_offload=self._cpu_offload
        )
        # RoPE caches are buffers outside the state dict: build them on the real device.
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        training.validate_no_params_on_meta_device(model)
        utils.log_rank_zero(
            log,
            f"HMT model ({model.config.mode}, {'LoRA' if lora else 'full fine-tune'}, {self._dtype}) "
            f"sharded over {self.world_size} ranks; {model.config.tokens_per_segment} new tokens "
            "per segment.",
        )
        return model

    def _restore(self, state: Dict[str, Any]) -> None:
        training.load_from_full_optimizer_state_dict(
            self._model, self._optimizer, state["optimizer"], self._device
        )
        if self._lr_scheduler is not None:
            self._lr_scheduler.load_state_dict(state["lr_scheduler"])
        if len(state["dataloader"]) != self.world_size:
            raise ValueError(
                f"the checkpoint was written by {len(state['dataloader'])} ranks; resume it with "
                f"--nproc_per_node {len(state['dataloader'])} (this run has {self.world_size})."
            )
        self._dataloader.load_state_dict(state["dataloader"][self.rank])
        rng = state["rng"][self.rank]
        if torch.is_tensor(rng):  # written before the CUDA generator was saved too
            rng = {"cpu": rng, "cuda": None}
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self._device)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, final: bool = False) -> None:
        full = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        recipe_state = None
        if not final:
            optimizer = training.get_full_optimizer_state_dict(
                self._model, self._optimizer, self._is_rank_zero, device=self._device
            )
            loaders = [None] * self.world_size
            rngs = [None] * self.world_size
            dist.all_gather_object(loaders, self._dataloader.state_dict())
            # CUDA's generator too: dropout on a GPU draws from it, and a resumed run must
            # draw what the uninterrupted one would have.
            cuda_rng = None
            if self._device.type == "cuda":
                cuda_rng = torch.cuda.get_rng_state(self._device)
            dist.all_gather_object(rngs, {"cpu": torch.get_rng_state(), "cuda": cuda_rng})
            recipe_state = {
                **self._recipe_state(optimizer, loaders, rngs), "world_size": self.world_size
            }
        if self._is_rank_zero:
            self._write_checkpoint(full, recipe_state, final, world_size=self.world_size)
        dist.barrier()

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        self._model.train()
        with self._profiler as profiler:
            self._train_epochs(profiler)
        self.save_checkpoint(final=True)
        if self._validation_cfg:
            # Every rank holds a shard of the model, so all ranks read the validation set in
            # lock step; rank 0 reports.
            run_validation(self._model, self._validation_cfg, self._tokenizer,
                           self._metric_logger if self._is_rank_zero else None,
                           self._device, self._output_dir, step=self.global_step)

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        dist.destroy_process_group()


@config.parse
@record  # torchrun's failure summary then quotes each rank's error instead of "<N/A>"
def recipe_main(cfg: DictConfig) -> None:
    if not training.is_distributed():
        raise RuntimeError(
            "hmt_finetune_distributed runs under torchrun: `hmt-tune run --nproc_per_node N "
            "hmt_finetune_distributed --config ...` (use hmt_finetune_single_device for one device)."
        )
    backend = training.get_distributed_backend(
        cfg.device, offload_ops_to_cpu=cfg.get("fsdp_cpu_offload", False)
    )
    # A bounded timeout: when a rank dies, the others fail with an error instead of hanging.
    timeout_s = cfg.get("distributed_timeout_s", 600)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    config.log_config(recipe_name="HMTFinetuneRecipeDistributed", cfg=cfg)
    recipe = HMTFinetuneRecipeDistributed(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
    except RuntimeError as err:
        if not faults.is_collective_failure(err):
            raise
        raise faults.collective_failure(
            err,
            rank=recipe.rank,
            world_size=recipe.world_size,
            step=recipe.global_step,
            timeout_s=timeout_s,
            latest_checkpoint=ckpt.latest_checkpoint(cfg.output_dir),
        ) from err
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
