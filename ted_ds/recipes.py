"""What each command trains: the TED stages and the baselines, as (engine, frozen side, loss, outputs).

``build_recipe`` turns a ``Plan`` (ted_ds.plan) and its job into a ``Recipe``: the DeepSpeed engine
of the trained module, the frozen model, the loss of one micro-batch and what to save once trained.
The trainer only ever sees a ``Recipe``.
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
from ted_ds.engine import build_frozen, build_trained_engine, compiled, compute_dtype
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
class Recipe:
    name: str  # also its checkpoints/ directory
    engine: object  # DeepSpeedEngine of the trained module
    frozen: Teacher | None  # a teacher placement (ted_ds.teacher), or None
    loss: Callable  # (MicroBatch, 0-based optimizer step) -> dict of terms with "loss"
    eval_loss: Callable  # (input_ids, labels) -> scalar tensor
    flops_per_token: float  # trained forward+backward + frozen forward, for MFU
    trained_model: nn.Module
    trained_filters: FilterBank | None  # what a checkpoint records for an offline export of the filters
    save_outputs: Callable  # (out_dir) -> the path written: what the recipe leaves once trained
    weights_at: Callable = lambda step: {}  # (0-based step) -> the loss weights scheduled at that step, to log


def build_distill(p: Plan, ds: dict) -> Recipe:
    """Stage 2 (ted), or a baseline (lwd, kd, lm), by ``distill.method``."""
    cfg = p.cfg
    method = cfg.distill.method
    trained, teacher_filters = distill_modules(p, dtype=compute_dtype(ds), zero_config=ds)
    if cfg.student.activation_checkpointing:
        trained.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled(cfg, trained.model, zero3=True)  # the student is always ZeRO-3 (resolve_ds_config)
    flops = flops_per_token(matmul_parameters(trained.model), p.student_config, cfg.data.seq_len, True)
    engine = build_trained_engine(cfg, trained, ds, p.total_steps)
    frozen = None
    if cfg.runs_teacher:
        teacher_vocab = p.manifest["vocab_size"] if p.cross is None else len(p.cross.teacher)
        frozen = build_frozen(cfg, functools.partial(load_teacher, cfg), p.teacher_layers if cfg.uses_layers else [],
                              teacher_filters, cfg.uses_logits and not cfg.logits_from_cache, ds, p.document_eos,
                              teacher_vocab)
        flops += flops_per_token(matmul_parameters(meta_model(p.teacher_config)), p.teacher_config,
                                  cfg.data.seq_len, False)
    draws = None
    if cfg.uses_logits and not cfg.logits_from_cache and cfg.teacher.logits_sampling == "sampled":
        draws = online_draws(cfg)
    top_p = cfg.teacher.logits_top_p is not None
    d = cfg.distill
    weights = ObjectiveWeights(d.alpha, d.beta, d.temperature, d.layer_loss, p.manifest["vocab_size"], d.divergence,
                               d.divergence_mix, cfg.teacher.logits_topk_form)
    weights_at = functools.partial(distill_weights, d, p.total_steps)
    objective = same_tokenizer_loss(frozen, cfg.logits_from_cache, engine, draws, top_p) if p.cross is None else \
        cross_tokenizer_loss(frozen, engine, p.cross.shared)
    loss = lambda batch, step: objective(batch, dataclasses.replace(weights, **weights_at(step)))

    def eval_loss(input_ids, labels):
        logits, _ = engine(input_ids)
        return lm_loss(logits, labels)

    tokenizer_dir = os.path.join(cfg.data.blend[0].path, "tokenizer")
    save = lambda out_dir: save_student(trained, p.student_config, tokenizer_dir, out_dir, cfg.data.seq_len)
    return Recipe(recipe_name(method, Job.DISTILL), engine, frozen, loss, eval_loss, flops, trained, trained.filters,
                  save, weights_at)


def same_tokenizer_loss(frozen: Teacher | None, from_cache: bool, engine, draws, top_p: bool) -> Callable:
    """(MicroBatch, the step's ObjectiveWeights) -> terms: the teacher (or its cache, read ahead into the
    batch) reads the student's ids."""
    def loss(batch: MicroBatch, w: ObjectiveWeights):
        t = teacher_side(frozen, batch, from_cache, draws, top_p)
        logits, taps = engine(batch.input_ids)
        return distill_objective(logits, taps, batch.labels, t and t.logits, t and t.taps, w, t and t.topk_index,
                                 t and t.support, t and t.counts)

    return loss


def cross_tokenizer_loss(frozen: Teacher, engine, shared: tuple | None) -> Callable:
    """(MicroBatch, the step's ObjectiveWeights) -> terms across tokenizers: the teacher reads its own tokens
    of the batch's text (``MicroBatch.teacher_view``); ``shared``: overlap_kl's vocabulary, else
    chunk_likelihood."""
    shared = None if shared is None else tuple(ids.to(engine.device) for ids in shared)

    def loss(batch: MicroBatch, w: ObjectiveWeights):
        t = frozen(batch.teacher_view.input_ids)
        logits, _ = engine(batch.input_ids)
        return cross_tokenizer_objective(logits, batch.labels, t.logits, batch.teacher_view, w, shared)

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


def build_filter_learning(p: Plan, ds: dict, job: Job) -> Recipe:
    """Stage 1: filters on the frozen model of ``job`` learn to predict the next token at every tap,
    through the teacher's frozen head or through a head of their own (``distill.filter_head``)."""
    cfg, which = p.cfg, job.filters_of
    if which == "teacher":
        layers, conf, load = p.teacher_layers, p.teacher_config, functools.partial(load_teacher, cfg)
    else:
        layers, conf, load = p.student_layers, p.student_config, functools.partial(load_student, p)
    bank = FilterBank(cfg.distill.filter, hidden_size(conf), p.filter_dim, layers, seed=cfg.train.seed,
                      model=p.models[which])
    bank = bank.to(compute_dtype(ds))  # initialised in fp32 (the same draws in any precision), trained in the run's
    head = TaskHead(cfg.teacher.path, cfg.teacher.trust_remote_code, compute_dtype(ds), distributed.device(),
                    p.manifest["vocab_size"])
    trainable = cfg.distill.filter_head == "trainable"
    engine = build_trained_engine(cfg, FiltersWithHeads(bank, head) if trainable else bank, ds, p.total_steps)
    if which == "student" and cfg.teacher.placement == "pipeline":  # a pipeline is for the teacher's size
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, placement="zero3"))
    frozen = build_frozen(cfg, load, layers, None, False, ds, p.document_eos)
    n_filter = sum(p_.numel() for p_ in bank.parameters() if p_.ndim >= 2)
    head_mm = hidden_size(p.teacher_config) * vocab_size(p.teacher_config)
    flops = (flops_per_token(matmul_parameters(meta_model(conf)), conf, cfg.data.seq_len, False)
             + 6 * n_filter + (8 if trainable else 4) * head_mm * len(layers))  # head: forward + backward(s)

    def terms(input_ids, labels):
        taps, labels = [h.to(engine.device) for h in frozen(input_ids).taps], labels.to(engine.device)
        per_tap = engine(taps, labels) if trainable else tap_lm_losses(head, engine(taps), labels)
        out = {f"tap_lm/L{layer}": v for layer, v in zip(layers, per_tap)}
        out["loss"] = torch.stack(per_tap).mean()
        return out

    loss = lambda batch, step: terms(batch.input_ids, batch.labels)
    eval_loss = lambda input_ids, labels: terms(input_ids, labels)["loss"]
    save = lambda out_dir: save_bank(bank, cfg.distill.filters_out or os.path.join(out_dir, job.value))
    return Recipe(recipe_name(cfg.distill.method, job), engine, frozen, loss, eval_loss, flops, bank, bank, save)


def build_recipe(p: Plan, ds: dict, job: Job) -> Recipe:
    """The recipe of ``job``, in training mode."""
    recipe = build_distill(p, ds) if job is Job.DISTILL else build_filter_learning(p, ds, job)
    recipe.engine.train()  # dropout on from the first step (from_pretrained hands models over in eval mode)
    return recipe
