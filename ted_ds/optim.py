"""The optimizer's side of a run, from ``optim.*`` alone: the LR schedule (a pure function of the step)
and which parameters decay."""

from __future__ import annotations

import math

from torch import nn

from ted_ds.architectures import ndim
from ted_ds.config import OptimConfig


def lr_multiplier(step: int, o: OptimConfig, total_steps: int) -> float:
    """LR ÷ optim.lr at 0-based ``step``: linear warmup from ``warmup_start_lr`` (0 by default; a
    continual run re-warms from its predecessor's final LR), then ``schedule``:

    cosine    decay to min_lr over the remaining steps
    wsd       warmup-stable-decay: constant, then linear decay to min_lr over the last
              ``decay_fraction`` of the run, reaching min_lr at the last step
    constant  stay at lr
    """
    floor, start = o.min_lr / o.lr, o.warmup_start_lr / o.lr
    if step < o.warmup_steps:
        return start + (1.0 - start) * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "wsd":
        decay_steps = wsd_decay_steps(o, total_steps)
        into_decay = step - (total_steps - decay_steps) + 1
        return 1.0 if into_decay <= 0 else 1.0 - (1.0 - floor) * min(1.0, into_decay / decay_steps)
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_decay_steps(o: OptimConfig, total_steps: int) -> int:
    """Steps of WSD's final decay: ``optim.decay_fraction`` of the run, at least one."""
    return max(1, round(o.decay_fraction * total_steps))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, norms and other vectors alone."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if ndim(p) >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
