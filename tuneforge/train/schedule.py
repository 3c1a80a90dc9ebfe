"""Step arithmetic of a run: the learning-rate schedule (warmup, then linear or cosine decay to a floor) and
which steps evaluate or checkpoint. Plain functions of integers; knows nothing about models or data.
"""

from __future__ import annotations

import math
from typing import Any, Literal


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    kind: Literal["linear", "cosine"],
    min_lr_ratio: float = 0.0,
    num_cycles: float = 0.5,
) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup rises linearly to 1 over `warmup_steps` steps (the first step already trains, at 1/warmup of the
    peak). Then linear decays from 1 towards `min_lr_ratio` at the end; cosine follows
    `min + (1 - min) * (1 + cos(2*pi*num_cycles*progress)) / 2`, which with the default half cycle falls
    from 1 to `min_lr_ratio` (the Hugging Face "cosine with min lr" shape).

    Args:
        step: optimizer steps already taken.
        total_steps: optimizer steps in the whole run.
        warmup_steps: steps of linear warmup.
        kind: "linear" or "cosine".
        min_lr_ratio: the floor, as a fraction of the peak.
        num_cycles: cosine cycles over the decay (0.5 = one half wave, peak to floor).

    Returns:
        A factor in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    wave = 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * wave


def warmup_steps_for(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps for a ratio of the run, rounded up so any ratio > 0 warms up at least one step."""
    return min(total_steps, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0


def make_scheduler(optimizer: Any, *, hyper: Any, total_steps: int) -> Any:
    """A `LambdaLR` over `lr_factor` for the run's hyperparameters (its state_dict is just the step count)."""
    from torch.optim.lr_scheduler import LambdaLR

    warmup = warmup_steps_for(hyper.warmup_ratio, total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total_steps=total_steps,
            warmup_steps=warmup,
            kind=hyper.lr_scheduler_type,
            min_lr_ratio=hyper.min_lr_ratio,
            num_cycles=hyper.scheduler_num_cycles,
        )

    return LambdaLR(optimizer, factor)


def evenly_spaced(count: int, total_steps: int) -> list[int]:
    """`count` steps spread evenly over 1..total_steps, the last one at the end; duplicates dropped.

    Args:
        count: how many (0 gives none).
        total_steps: the run's last step.

    Returns:
        Sorted distinct steps in [1, total_steps].
    """
    if count <= 0 or total_steps <= 0:
        return []
    return sorted({max(1, round(total_steps * k / count)) for k in range(1, count + 1)})


def checkpoint_steps(n_checkpoints: int, total_steps: int) -> list[int]:
    """Intermediate checkpoint steps: `n_checkpoints` evenly spaced, minus the last, which is the final output."""
    return [s for s in evenly_spaced(n_checkpoints, total_steps) if s < total_steps]
