"""What each command trains: the TED stages and the baselines, as train modules.

``build_recipe`` turns a ``Plan`` (ted_ds.plan) and its job into a ``TrainModule``: the DeepSpeed engine
of the trained module, the frozen model, the loss of one micro-batch (a method: the forward is read
here) and what to save once trained. The trainer only ever sees a ``TrainModule``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ted_ds import distributed
from ted_ds.architectures import hidden_size, meta_model, vocab_size
from ted_ds.data import MicroBatch
from ted_ds.engine import DeepSpeedSettings, build_trained_engine, place_frozen, place_student
from ted_ds.export import save_bank, save_student
from ted_ds.filters import FilterBank
from ted_ds.heads import TaskHead
from ted_ds.losses import ObjectiveWeights, cross_tokenizer_objective, distill_objective, lm_loss, tap_lm_losses
from ted_ds.metrics import flops_per_token, matmul_parameters
from ted_ds.models import FiltersWithHeads, distill_modules, load_student, load_teacher
from ted_ds.optim import distill_weights
from ted_ds.plan import Job, Plan, recipe_name
from ted_ds.teacher import LOGITS_DTYPES, Draws, Teacher, teacher_side


@dataclass
class TrainModule:
    """What the trainer trains, and all it knows of it (the boundary of OLMo-core's ``TrainModule``): the
    DeepSpeed engine, the frozen side, per micro-batch the loss; once trained, what it leaves. Built by
    ``build_recipe``; ``DistillModule`` (stage 2 and the baselines) and ``FilterModule`` (stage 1)."""

    name: str  # also its checkpoints/ directory
    plan: Plan
    engine: object  # DeepSpeedEngine of the trained module
    frozen: Teacher | None  # a teacher placement (ted_ds.teacher): the teacher, or stage 1's frozen model
    flops_per_token: float  # trained forward+backward + frozen forward, for MFU
    trained_model: nn.Module
    trained_filters: FilterBank | None  # what a checkpoint records for an offline export of the filters

    def loss(self, batch: MicroBatch, step: int) -> dict[str, torch.Tensor]:
        """The terms of one micro-batch at 0-based optimizer ``step``, with "loss" (what is backpropagated)."""
        raise NotImplementedError

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scalar validation loss of one batch."""
        raise NotImplementedError

    def save_outputs(self, out_dir: str) -> str:
        """Write what the module leaves once trained; the path written."""
        raise NotImplementedError

    def weights_at(self, step: int) -> dict[str, float]:
        """The loss weights scheduled at 0-based ``step``, to log (none by default)."""
        return {}

    def checkpoint_identity(self) -> dict:
        """What a checkpoint must match to be resumed by this module."""
        p = self.plan
        return {"recipe": self.name, "vocab_sha256": p.manifest["tokenizer"]["vocab_sha256"],
                "student_layers": p.student_config.num_hidden_layers,
                "student_hidden": p.student_config.hidden_size, "taps": [list(x) for x in p.pairs],
                "seq_len": p.cfg.data.seq_len, "global_batch_size": p.cfg.train.global_batch_size}


@dataclass
class DistillModule(TrainModule):
    """Stage 2 (ted) or a baseline (lwd, kd, lm): the student (with its filters or LWD's map) against the
    teacher's taps and logits, online, from the cache read ahead into the batch, or drawn from them."""

    weights: ObjectiveWeights  # the objective's settings, α and β as configured (weights_at schedules them)
    from_cache: bool  # teacher.cache: the logits are the batch's teacher_rows
    draws: Draws | None  # teacher.logits_sampling: sampled, online
    top_p: bool  # teacher.logits_top_p: each token's support read from the logits
    cross: Callable | None  # across tokenizers: cross_tokenizer_loss's objective, else None

    def weights_at(self, step: int) -> dict[str, float]:
        return distill_weights(self.plan.cfg.distill, self.plan.total_steps, step)

    def loss(self, batch: MicroBatch, step: int) -> dict[str, torch.Tensor]:
        w = dataclasses.replace(self.weights, **self.weights_at(step))
        if self.cross is not None:
            return self.cross(batch, w)
        t = teacher_side(self.frozen, batch, self.from_cache, self.draws, self.top_p)
        logits, taps = self.engine(batch.input_ids)
        return distill_objective(logits, taps, batch.labels, t and t.logits, t and t.taps, w, t and t.topk_index,
                                 t and t.support, t and t.counts)

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, _ = self.engine(input_ids)
        return lm_loss(logits, labels)

    def save_outputs(self, out_dir: str) -> str:
        cfg = self.plan.cfg
        tokenizer_dir = os.path.join(cfg.data.blend[0].path, "tokenizer")
        return save_student(self.trained_model, self.plan.student_config, tokenizer_dir, out_dir, cfg.data.seq_len)


def build_distill(p: Plan, ds: DeepSpeedSettings) -> DistillModule:
    """Stage 2 (ted), or a baseline (lwd, kd, lm), by ``distill.method``."""
    cfg = p.cfg
    trained, teacher_filters = distill_modules(p, dtype=ds.dtype, zero_config=ds.config)
    flops = flops_per_token(matmul_parameters(trained.model), p.student_config, cfg.data.seq_len, True)
    engine = place_student(cfg, trained, ds, p.total_steps)
    frozen = None
    if cfg.runs_teacher:
        teacher_vocab = p.manifest["vocab_size"] if p.cross is None else len(p.cross.teacher)
        frozen = place_frozen(cfg, functools.partial(load_teacher, cfg), p.teacher_layers if cfg.uses_layers else [],
                              teacher_filters, cfg.uses_logits and not cfg.logits_from_cache, ds, p.document_eos,
                              teacher_vocab)
        flops += flops_per_token(matmul_parameters(meta_model(p.teacher_config)), p.teacher_config,
                                  cfg.data.seq_len, False)
    draws = None
    if cfg.uses_logits and not cfg.logits_from_cache and cfg.teacher.logits_sampling == "sampled":
        draws = online_draws(cfg)
    d = cfg.distill
    weights = ObjectiveWeights(d.alpha, d.beta, d.temperature, d.layer_loss, p.manifest["vocab_size"], d.divergence,
                               d.divergence_mix, cfg.teacher.logits_topk_form)
    cross = None if p.cross is None else cross_tokenizer_loss(frozen, engine, p.cross.shared)
    return DistillModule(recipe_name(d.method, Job.DISTILL), p, engine, frozen, flops, trained, trained.filters,
                         weights, cfg.logits_from_cache, draws, cfg.teacher.logits_top_p is not None, cross)


def cross_tokenizer_loss(frozen: Teacher, engine, shared: tuple | None) -> Callable:
    """(MicroBatch, the step's ObjectiveWeights) -> terms across tokenizers: the teacher reads its own tokens
    of the batch's text (``MicroBatch.teacher_view``); ``shared``: overlap_kl's vocabulary, else
    chunk_likelihood; with TED the taps of both sides too."""
    shared = None if shared is None else tuple(ids.to(engine.device) for ids in shared)

    def loss(batch: MicroBatch, w: ObjectiveWeights):
        t = frozen(batch.teacher_view.input_ids)
        logits, taps = engine(batch.input_ids)
        return cross_tokenizer_objective(logits, batch.labels, t.logits, batch.teacher_view, w, shared, taps, t.taps)

    return loss


def online_draws(cfg) -> Draws:
    """The draws of a run whose teacher runs online with teacher.logits_sampling: sampled."""
    from ted_ds.cache.format import source_key
    from ted_ds.data import PackedShardDataset, source_offsets

    sources = cfg.data.blend
    sizes = [len(PackedShardDataset(s.path, "train", cfg.data.seq_len)) for s in sources]
    t = cfg.teacher
    return Draws(cfg.train.seed, t.logits_samples, cfg.distill.temperature, LOGITS_DTYPES[t.logits_dtype],
                 tuple(source_key(s.path)[0] for s in sources), source_offsets(sizes))


@dataclass
class FilterModule(TrainModule):
    """Stage 1: filters on a frozen model (``frozen``: the teacher, or the student) learn to predict the next
    token at every tap, through the teacher's frozen head or through heads of their own (``trainable``)."""

    layers: list[int]  # the frozen model's tapped layers
    head: TaskHead
    trainable: bool  # distill.filter_head: trainable (the engine holds the filters and their heads)
    bank_out: str  # where the learnt bank is saved

    def terms(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        taps, labels = [h.to(self.engine.device) for h in self.frozen(input_ids).taps], labels.to(self.engine.device)
        per_tap = self.engine(taps, labels) if self.trainable else tap_lm_losses(self.head, self.engine(taps), labels)
        out = {f"tap_lm/L{layer}": v for layer, v in zip(self.layers, per_tap)}
        out["loss"] = torch.stack(per_tap).mean()
        return out

    def loss(self, batch: MicroBatch, step: int) -> dict[str, torch.Tensor]:
        return self.terms(batch.input_ids, batch.labels)

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.terms(input_ids, labels)["loss"]

    def save_outputs(self, out_dir: str) -> str:
        return save_bank(self.trained_filters, self.bank_out or os.path.join(out_dir, self.name))


def build_filter_learning(p: Plan, ds: DeepSpeedSettings, job: Job) -> FilterModule:
    """Stage 1 of ``job``: the filters of its model (``FilterModule``)."""
    cfg, which = p.cfg, job.filters_of
    if which == "teacher":
        layers, conf, load = p.teacher_layers, p.teacher_config, functools.partial(load_teacher, cfg)
    else:
        layers, conf, load = p.student_layers, p.student_config, functools.partial(load_student, p)
    bank = FilterBank(cfg.distill.filter, hidden_size(conf), p.filter_dim, layers, seed=cfg.train.seed,
                      model=p.models[which])
    bank = bank.to(ds.dtype)  # initialised in fp32 (the same draws in any precision), trained in the run's
    head = TaskHead(cfg.teacher.path, cfg.teacher.trust_remote_code, ds.dtype, distributed.device(),
                    p.manifest["vocab_size"])
    trainable = cfg.distill.filter_head == "trainable"
    engine = build_trained_engine(cfg, FiltersWithHeads(bank, head) if trainable else bank, ds, p.total_steps)
    if which == "student" and cfg.teacher.placement == "pipeline":  # a pipeline is for the teacher's size
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, placement="zero3"))
    frozen = place_frozen(cfg, load, layers, None, False, ds, p.document_eos)
    n_filter = sum(p_.numel() for p_ in bank.parameters() if p_.ndim >= 2)
    head_mm = hidden_size(p.teacher_config) * vocab_size(p.teacher_config)
    flops = (flops_per_token(matmul_parameters(meta_model(conf)), conf, cfg.data.seq_len, False)
             + 6 * n_filter + (8 if trainable else 4) * head_mm * len(layers))  # head: forward + backward(s)
    return FilterModule(recipe_name(cfg.distill.method, job), p, engine, frozen, flops, bank, bank, layers, head,
                        trainable, cfg.distill.filters_out)


def build_recipe(p: Plan, ds: DeepSpeedSettings, job: Job) -> TrainModule:
    """The recipe of ``job``, in training mode."""
    recipe = build_distill(p, ds) if job is Job.DISTILL else build_filter_learning(p, ds, job)
    recipe.engine.train()  # dropout on from the first step (from_pretrained hands models over in eval mode)
    return recipe
