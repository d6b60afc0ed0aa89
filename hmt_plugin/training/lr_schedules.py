"""Learning-rate schedules with torchtune's builder signature
``(optimizer, num_warmup_steps, num_training_steps, last_epoch)``."""

import torch
from torch.optim.lr_scheduler import LambdaLR


def step_decay_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int = 0,
    *,
    step_size: int = 100,
    gamma: float = 0.6,
    num_warmup_steps: int = 0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Multiply the learning rate by ``gamma`` every ``step_size`` optimizer steps (the
    published HMT runs: ``StepLR(step_size=100, gamma=0.6)``), after an optional linear
    warm-up. ``num_training_steps`` is accepted for torchtune recipes and unused."""
    if step_size < 1:
        raise ValueError(f"lr_scheduler.step_size={step_size} must be >= 1.")

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step + 1) / num_warmup_steps
        return gamma ** (step // step_size)

    return LambdaLR(optimizer, factor, last_epoch)
