"""The models a recipe trains and runs: loaders of the teacher and the student, and the trained modules.

Every loader takes a placement (dtype, device, ZeRO-3 config: see ``weights.load_model``); the
trained modules put the filters next to their model: ``distill_modules`` (stage 2 and the
baselines: a ``TappedLM``), ``FiltersWithHeads`` (stage 1 with heads of its own), ``lwd_map`` (LWD's map).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ted_ds import distributed
from ted_ds.architectures import hidden_size, model_from_config, teacher_hf_config
from ted_ds.checkpoint import CONVERSION_WAIT, resolve_checkpoint
from ted_ds.config import DistillConfig, RunConfig
from ted_ds.documents import for_model
from ted_ds.filters import FilterBank, load_filter_bank
from ted_ds.losses import trained_head_lm_loss
from ted_ds.plan import Plan, expected_bank, is_hf_dir
from ted_ds.taps import TappedLM
from ted_ds.weights import load_model, load_teacher_blocks


def load_teacher(cfg: RunConfig, **placement) -> nn.Module:
    """The teacher's weights as ``placement`` says (dtype, device, zero_config: see weights.load_model)."""
    return load_model(cfg.teacher.path, cfg.teacher.trust_remote_code, config=teacher_hf_config(cfg.teacher),
                      **placement)


def init_from_hf_dir(cfg: RunConfig) -> str:
    """``train.init_from`` as an HF directory: itself, or (a checkpoint) its student exported once by
    rank 0 into ``<out_dir>/init-from-<tag>`` with ``ted-ds export``'s own check.  The others wait as
    for a checkpoint conversion (``distributed.rank0_alone``, up to ``CONVERSION_WAIT``), not
    train.timeout_minutes: the export reads and writes the whole student."""
    from ted_ds.export import export_checkpoint

    if is_hf_dir(cfg.train.init_from):
        return cfg.train.init_from
    ckpt_dir, tag = resolve_checkpoint(cfg.train.init_from, None)
    target = os.path.join(cfg.train.out_dir, f"init-from-{tag}")

    def export() -> None:
        if is_hf_dir(target):
            return
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        for line in export_checkpoint(os.path.join(ckpt_dir, tag), target):
            print(f"ted-ds: train.init_from: {line}", flush=True)

    distributed.rank0_alone(export, CONVERSION_WAIT)
    return target


def load_student(p: Plan, **placement) -> nn.Module:
    """The student from another run (``train.init_from``), its own directory, teacher blocks (reading
    only those), or random.

    A random student is built whole in fp32 on every rank (then cast and partitioned): only small
    students start from scratch, and so every rank and the single-process reference agree."""
    s, config = p.cfg.student, p.student_config  # the plan's: with the run's attention kernel
    if p.cfg.train.init_from:
        return load_model(init_from_hf_dir(p.cfg), s.trust_remote_code, config=config, **placement)
    if s.path:
        return load_model(s.path, s.trust_remote_code, config=config, **placement)
    if s.init_from_teacher is not None:
        return load_teacher_blocks(p.cfg.teacher.path, s.init_from_teacher, p.cfg.teacher.trust_remote_code,
                                   config=config, **placement)
    model = model_from_config(p.student_config, p.cfg.train.seed)
    return model.to(placement.get("dtype", torch.float32))


def distill_modules(p: Plan, **placement) -> tuple[TappedLM, FilterBank | None]:
    """The modules of a distill run, before any engine: the student with its filters (ted: its stage-1
    bank; lwd: a fresh map; kd, lm: none) and the teacher's stage-1 bank (ted), in ``placement``'s
    dtype.  The run and the single-process reference of the tests build them here alike."""
    cfg, dtype = p.cfg, placement.get("dtype", torch.float32)
    student = load_student(p, **placement)
    student_filters, teacher_filters = None, None
    if cfg.distill.method == "ted" and cfg.uses_layers:
        student_filters, teacher_filters = (load_filter_bank(getattr(cfg, side).filters, expected_bank(p, side),
                                                             f"{side}.filters") for side in ("student", "teacher"))
    elif cfg.distill.method == "lwd" and cfg.uses_layers:
        student_filters = lwd_map(cfg.distill, hidden_size(p.student_config), hidden_size(p.teacher_config),
                                  p.student_layers, cfg.train.seed)
    if student_filters is not None:  # DeepSpeed casts no module whose student is already partitioned
        student_filters = student_filters.to(dtype)
    trained = TappedLM(student, p.student_layers if cfg.uses_layers else [], student_filters,
                       for_model(student, p.document_eos, dtype))
    return trained, teacher_filters


class FiltersWithHeads(nn.Module):
    """The trained module of stage 1 with ``distill.filter_head: trainable``: the bank and one
    next-token head per tap (copies of the teacher's final norm + unembedding). Only the bank is
    kept after stage 1; the heads exist to train it."""

    def __init__(self, bank: FilterBank, head: nn.Module):
        super().__init__()
        self.bank = bank
        self.heads = nn.ModuleList(copy.deepcopy(head).requires_grad_(True) for _ in bank.layers)

    def forward(self, states: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        return [trained_head_lm_loss(head, h, labels) for head, h in zip(self.heads, self.bank(states))]


def lwd_map(d: DistillConfig, d_s: int, d_t: int, layers: list[int], seed: int) -> FilterBank:
    """LWD's trainable student map into the teacher's raw hidden space, started as ``distill.lwd_map_init`` says."""
    return FilterBank(d.filter, d_s, d_t, layers, seed=seed, init=d.lwd_map_init)
