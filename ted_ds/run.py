"""A whole command: check, start the process group, build the recipe, train (or resume), save its outputs.

``setup`` is everything before a recipe exists; ``run_recipe`` the rest.  The benchmarks and the
multi-rank tests call these, not a copy.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import replace

import numpy as np
import torch

from ted_ds import distributed
from ted_ds.capacity import check_fits
from ted_ds.checkpoint import Checkpointer, CheckpointRecord, owned_config_changes, saved_record
from ted_ds.config import RunConfig, save_config, to_dict
from ted_ds.engine import DeepSpeedSettings, resolve_ds_config
from ted_ds.launch import check_world
from ted_ds.plan import Job, Plan, plan, recipe_name
from ted_ds.recipes import TrainModule, build_recipe
from ted_ds.trainer import FitResult, StopSignal, fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: RunConfig, job: Job = Job.DISTILL) -> tuple[Plan, DeepSpeedSettings]:
    """Everything before a recipe is built: check the run against its files, ranks and devices, start
    the process group, seed.  Returns the plan and the resolved DeepSpeed settings."""
    p, ds = checked_plan(cfg, job)
    start_group(p)
    return p, ds


def checked_plan(cfg: RunConfig, job: Job) -> tuple[Plan, DeepSpeedSettings]:
    """The plan and the resolved DeepSpeed settings, the run checked against its files, ranks and devices.

    Every check happens before the process group, and the rank's GPU is chosen from its launcher's
    variables before the first thing that touches CUDA (the free-memory check)."""
    p = plan(cfg, job)
    world = distributed.expected_world_size()
    with_teacher = cfg.runs_teacher or job is Job.FILTERS_TEACHER
    check_world(cfg, world, with_teacher)  # every reason the ranks do not fit, in one line
    ds = resolve_ds_config(cfg, world)
    own_heads = job is not Job.DISTILL and cfg.distill.filter_head == "trainable"
    check_fits(p, ds, world, distributed.local_world_size(),
               with_teacher=with_teacher,
               trained_heads=len(p.pairs) if own_heads else 0, device=distributed.device())
    return p, ds


def start_group(p: Plan) -> None:
    """The process group, then the seed."""
    distributed.init(p.cfg.train.timeout_minutes)
    if distributed.rank() == 0 and p.vocabularies:
        print(f"ted-ds: {p.vocabularies}", file=sys.stderr)  # the sizes the checks compared
    seed_everything(p.cfg.train.seed)


def checkpointer(recipe: TrainModule, p: Plan) -> Checkpointer:
    """The recipe's checkpoints: what must match on resume (identity) and what an offline export needs."""
    cfg = p.cfg
    bank = recipe.trained_filters
    run_info = {"config": to_dict(cfg), "student_config": p.student_config.to_dict(),
                "filters": bank.meta() if bank is not None else None,
                "tokenizer": os.path.abspath(os.path.join(cfg.data.blend[0].path, "tokenizer"))}
    return Checkpointer(checkpoint_dir(cfg, recipe.name), cfg.train.keep_last, recipe.checkpoint_identity(), run_info)


def checkpoint_dir(cfg: RunConfig, recipe: str) -> str:
    return os.path.join(cfg.train.out_dir, "checkpoints", recipe)


def owned_config(cfg: RunConfig, job: Job) -> tuple[CheckpointRecord | None, dict[str, tuple]]:
    """Before the process group: the record of the job's checkpoint this launch would resume (None: it starts
    afresh) and the safe config changes it makes (``checkpoint.owned_config_changes`` refuses the others)."""
    ckpt_dir = checkpoint_dir(cfg, recipe_name(cfg.distill.method, job))
    record = saved_record(ckpt_dir)
    return record, owned_config_changes(record, cfg, ckpt_dir) if record is not None else {}


def record_config(cfg: RunConfig, recipe: str) -> None:
    """``<out_dir>/config-<recipe>.yaml``: the config a job started with, one file per job of the out_dir
    (a resumed launch changes only safe keys, recorded in metrics.jsonl)."""
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.train.out_dir, f"config-{recipe}.yaml"))


def run_recipe(cfg: RunConfig, job: Job = Job.DISTILL) -> tuple[TrainModule, Plan, FitResult]:
    """A whole command of ``job``; returns the recipe, its plan and what training gave (with ``output``,
    the path the recipe saved, unless a signal stopped the run first)."""
    stop = StopSignal()  # from the very start: a warning during set-up is honoured after the first step
    try:
        p, ds = checked_plan(cfg, job)
        resumed, changed = owned_config(p.cfg, job)  # the config as run: hub ids resolved, as checkpoints hold it
        start_group(p)
        recipe = build_recipe(p, ds, job)
        if distributed.rank() == 0 and resumed is None:
            record_config(cfg, recipe.name)
        result = fit(recipe, p, checkpointer(recipe, p), stop, changed)
        if not result.stopped:
            result = replace(result, output=recipe.save_outputs(cfg.train.out_dir))
        return recipe, p, result
    finally:
        stop.restore()
