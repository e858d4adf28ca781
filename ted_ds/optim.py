"""The optimizer's side of a run, from ``optim.*`` alone: the LR schedule (a pure function of the step)
and which parameters decay."""

from __future__ import annotations

import math

from torch import nn

from ted_ds.architectures import ndim
from ted_ds.config import DistillConfig, OptimConfig, RunConfig
from ted_ds.errors import ConfigError


def lr_multiplier(step: int, o: OptimConfig, total_steps: int) -> float:
    """LR ÷ optim.lr at 0-based ``step``: linear warmup from ``warmup_start_lr`` (0 by default; a
    continual run re-warms from its predecessor's final LR), then ``schedule`` (``multiplier``) down to
    min_lr."""
    return multiplier(step, total_steps, o.schedule, o.min_lr / o.lr, o.warmup_steps, o.warmup_start_lr / o.lr,
                      o.decay_fraction)


def multiplier(step: int, total_steps: int, schedule: str, floor: float, warmup_steps: int = 0,
               warmup_start: float = 0.0, decay_fraction: float = 0.1) -> float:
    """A scheduled value ÷ its peak at 0-based ``step``, the one code path of the LR's and the distillation
    weights' schedules: linear warmup from ``warmup_start`` over ``warmup_steps``, then

    cosine    decay to ``floor`` over the remaining steps
    wsd       warmup-stable-decay: constant, then linear decay to ``floor`` over the last
              ``decay_fraction`` of the run, reaching it at the last step
    linear    straight from 1 after the warmup to ``floor`` at the last step (``floor`` > 1: a rise)
    constant  stay at 1
    """
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = wsd_decay_steps(decay_fraction, total_steps)
        into_decay = step - (total_steps - decay_steps) + 1
        return 1.0 if into_decay <= 0 else 1.0 - (1.0 - floor) * min(1.0, into_decay / decay_steps)
    if schedule == "linear":
        return 1.0 - (1.0 - floor) * min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def distill_weights(d: DistillConfig, total_steps: int, step: int) -> dict[str, float]:
    """α and β at 0-based ``step`` by ``distill.alpha_schedule`` / ``beta_schedule``: from ``alpha`` (``beta``)
    to ``alpha_final`` (``beta_final``), warming up from 0 over ``distill.weight_warmup_steps``. A pure function
    of the step, so a resumed run has the weights of the run it continues."""
    def at(peak: float, schedule: str, final: float) -> float:
        if schedule == "constant" or peak == 0:
            return peak
        return peak * multiplier(step, total_steps, schedule, final / peak, d.weight_warmup_steps, 0.0,
                                 d.weight_decay_fraction)

    return {"alpha": at(d.alpha, d.alpha_schedule, d.alpha_final), "beta": at(d.beta, d.beta_schedule, d.beta_final)}


def wsd_decay_steps(decay_fraction: float, total_steps: int) -> int:
    """Steps of WSD's final decay: ``decay_fraction`` of the run, at least one."""
    return max(1, round(decay_fraction * total_steps))


def check_schedule_lengths(cfg: RunConfig, total_steps: int) -> None:
    """A WSD schedule's warmup and decay fit in the run (the LR's, and the distillation weights'); one line
    otherwise."""
    o, d = cfg.optim, cfg.distill
    wsd = [("optim.schedule", o.warmup_steps, o.decay_fraction, "optim.decay_fraction")] * (o.schedule == "wsd")
    wsd += [(f"distill.{w}_schedule", d.weight_warmup_steps, d.weight_decay_fraction, "distill.weight_decay_fraction")
            for w in ("alpha", "beta") if getattr(d, f"{w}_schedule") == "wsd"]
    for name, warmup, fraction, fraction_name in wsd:
        decay = wsd_decay_steps(fraction, total_steps)
        if warmup + decay > total_steps:
            raise ConfigError(f"{name} wsd: {warmup} warmup + {decay} decay steps ({fraction_name} {fraction:g}) "
                              f"exceed the run's {total_steps} steps")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, norms and other vectors alone."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if ndim(p) >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
