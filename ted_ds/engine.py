"""The one place that builds DeepSpeed engines: the trained module (ZeRO-3) and the frozen side.

* ``resolve_ds_config`` fills a ds_configs/ JSON from the run config ("auto") and refuses values
  that disagree with it, so batch size, accumulation, clipping and LR have one source of truth; it
  returns ``DeepSpeedSettings``, the JSON with the compute dtype it sets.
* ``build_trained_engine`` puts the trained module (student + its filters, or a filter bank in
  stage 1) under ``deepspeed.initialize`` with our AdamW (or the JSON's optimizer) and the schedule
  of ted_ds.optim.
* The one placement step of each side (torchtitan's ``parallelize_*``: every wrapper applied in one
  visible order): ``place_student`` (activation checkpointing, compiled blocks, the ZeRO-3 engine) and
  ``place_frozen`` (a frozen model by ``teacher.placement``, its blocks compiled where asked).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ted_ds import distributed
from ted_ds.architectures import compile_blocks
from ted_ds.config import RunConfig, accumulation_steps
from ted_ds.documents import for_model
from ted_ds.errors import ConfigError
from ted_ds.optim import lr_multiplier, param_groups
from ted_ds.taps import TappedLM
from ted_ds.teacher import LOGITS_DTYPES, FrozenLM, ReplicatedTeacher, Teacher, Zero3Teacher, top_p_of
from ted_ds.weights import check_dtype

_DERIVED_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay")


def _fill(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f"{where}: {key}={current!r} disagrees with the run config ({value!r}); "
                          f'set it to "auto" or change the run config')


def compute_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The run's DeepSpeed config and the compute dtype it sets, resolved once (``resolve_ds_config``):
    what builds the engines, places the teacher and checks capacity reads, none re-deriving the dtype."""

    config: dict  # DeepSpeed's JSON as deepspeed.initialize takes it
    dtype: torch.dtype  # the models' compute dtype: bf16 / fp16 as the config enables, else fp32

    @classmethod
    def of(cls, config: dict) -> DeepSpeedSettings:
        return cls(config, compute_dtype(config))


def resolve_ds_config(cfg: RunConfig, world_size: int) -> DeepSpeedSettings:
    """The DeepSpeed settings of this run: its JSON with derived values filled and checked."""
    path = cfg.train.deepspeed_config
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    _fill(ds, "train_micro_batch_size_per_gpu", mb, path)
    _fill(ds, "gradient_accumulation_steps", accumulation_steps(gb, mb, world_size), path)
    _fill(ds, "train_batch_size", gb, path)
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, path)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key in _DERIVED_OPTIMIZER_KEYS:
            value = list(cfg.optim.betas) if key == "betas" else getattr(cfg.optim, key)
            _fill(params, key, value, f"{path} optimizer.params")
    else:
        ds["zero_allow_untested_optimizer"] = True  # our torch AdamW under ZeRO
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove the 'scheduler' section; the schedule comes from optim.* in the run config")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise ConfigError(f"{path}: zero_optimization.stage is {stage}; ted-ds builds and trains the student under "
                          "ZeRO-3 (for a student that fits every rank, keep its parameters whole with "
                          "zero_optimization.stage3_param_persistence_threshold above its largest tensor)")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return DeepSpeedSettings.of(ds)


def frozen_ds_config(ds: dict) -> dict:
    """Inference-only ZeRO-3 config for a frozen model: same precision and batch, no optimizer."""
    frozen = copy.deepcopy(ds)
    for key in ("optimizer", "scheduler", "zero_allow_untested_optimizer", "gradient_clipping"):
        frozen.pop(key, None)
    zero = frozen.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    return frozen


def build_trained_engine(cfg: RunConfig, module: nn.Module, ds: DeepSpeedSettings, total_steps: int):
    import deepspeed

    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.optim, total_steps))
    check_dtype(module, ds.dtype, "the trained parameters", trained_only=True)
    groups = param_groups(module, cfg.optim.weight_decay)
    optimizer = None
    if "optimizer" not in ds.config:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, model_parameters=groups,
                                      lr_scheduler=schedule, config=ds.config)
    return engine


def compiled(cfg: RunConfig, model: nn.Module, zero3: bool = False) -> nn.Module:
    """``model`` with its decoder blocks compiled where ``train.compile_blocks`` asks (see compile_blocks)."""
    return compile_blocks(model, zero3) if cfg.train.compile_blocks else model


def place_student(cfg: RunConfig, trained: TappedLM, ds: DeepSpeedSettings, total_steps: int):
    """The student's one placement step, on the module ``distill_modules`` read into this rank's ZeRO-3
    share, in this order: activation checkpointing (``student.activation_checkpointing``), its blocks
    compiled as ZeRO-3 leaves (``train.compile_blocks``), the trained ZeRO-3 engine.  Its engine."""
    if cfg.student.activation_checkpointing:
        trained.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled(cfg, trained.model, zero3=True)  # the student is always ZeRO-3 (resolve_ds_config)
    return build_trained_engine(cfg, trained, ds, total_steps)


def place_frozen(cfg: RunConfig, load_model, layers: list[int], filters, need_logits: bool, ds: DeepSpeedSettings,
                 document_eos: int | None = None, vocab: int | None = None) -> Teacher:
    """The frozen side's one placement step, by ``teacher.placement``: its weights, its blocks compiled
    (``train.compile_blocks``), then its wrapper.  ``load_model(dtype=, device=, zero_config=)``
    reads its weights straight into the rank's share: a whole copy on the device (replicated), this
    rank's ZeRO-3 slices (zero3); the pipeline reads its stage alone.  ``document_eos``: packed
    documents stay apart (``data.document_attention``, see ted_ds.documents).  ``vocab``: logits keep
    only the tokenizer's ids (a head padded past them drops its extra rows before KD and top-k)."""
    placement = cfg.teacher.placement
    dtype, device = ds.dtype, distributed.device()
    if filters is not None:
        filters = filters.to(device, dtype)
    t = cfg.teacher
    logits = dict(logits_topk=t.logits_topk, vocab=vocab, logits_dtype=LOGITS_DTYPES[t.logits_dtype],
                  tail_temperature=cfg.tail_temperature, top_p=top_p_of(cfg))
    if placement == "replicated":
        model = compiled(cfg, load_model(dtype=dtype, device=device))
        return ReplicatedTeacher(FrozenLM(model, layers, filters, need_logits,
                                          documents=for_model(model, document_eos, dtype), **logits), device)
    if placement == "zero3":
        import deepspeed

        fds = frozen_ds_config(ds.config)
        model = compiled(cfg, load_model(dtype=dtype, zero_config=fds), zero3=True)
        frozen = FrozenLM(model, layers, filters, need_logits, documents=for_model(model, document_eos, dtype),
                          **logits)
        check_dtype(frozen, dtype, "the ZeRO-3 teacher")
        engine, *_ = deepspeed.initialize(model=frozen, config=fds)
        return Zero3Teacher(engine)
    if placement == "pipeline":
        from ted_ds.pipeline.schedule import build_pipeline_teacher

        teacher = build_pipeline_teacher(cfg, layers, filters, need_logits, dtype, document_eos, vocab)
        compiled(cfg, teacher.model)
        return teacher
    raise ConfigError(f"unknown teacher.placement {placement!r}")
