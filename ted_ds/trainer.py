"""The training loop shared by every stage: sample, forward/backward, step, log, evaluate, save.

The loop knows nothing of TED: a ``Stage`` (ted_ds.stages) gives it the engine and the loss of
one micro-batch.  Resume is automatic from ``<out_dir>/checkpoints/latest``; SIGTERM/SIGUSR1
(SLURM's warnings before preemption or the time limit) make every rank save and exit cleanly.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from ted_ds import distributed
from ted_ds.capacity import check_fits
from ted_ds.checkpoint import Checkpointer
from ted_ds.config import RunConfig, save_config, to_dict
from ted_ds.data import Blend, BlendedDataset, ConsumedSamplesSampler, PackedShardDataset, collate
from ted_ds.engine import resolve_ds_config
from ted_ds.errors import TrainingError
from ted_ds.export import save_trained_outputs
from ted_ds.metrics import MetricsLogger, device_peak_flops
from ted_ds.stages import Plan, Stage, build_distill, build_filter_learning, plan


class StopSignal:
    """Remembers that SIGTERM/SIGUSR1 arrived; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal (one collective)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=distributed.device())
        return bool(distributed.all_reduce_sum(flag).item() > 0)


@torch.no_grad()
def evaluate(stage: Stage, valid: PackedShardDataset, samples: int, micro_batch: int) -> float:
    """Mean eval loss over the first ``samples`` validation windows, split evenly over ranks
    (every rank runs the same number of forwards, as ZeRO-3 needs)."""
    world = distributed.world_size()
    n = max(world, min(samples, len(valid)) // world * world)
    mine = list(range(distributed.rank(), n, world))
    stage.engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=distributed.device())
    for i in range(0, len(mine), micro_batch):
        window = [j % len(valid) for j in mine[i:i + micro_batch]]
        input_ids, labels = (t.to(distributed.device()) for t in collate(valid, window))
        loss = stage.eval_loss(input_ids, labels)
        total += torch.tensor([loss.item() * len(input_ids), len(input_ids)], dtype=torch.float64,
                              device=distributed.device())
    stage.engine.train()
    total = distributed.all_reduce_sum(total)
    return float(total[0] / total[1])


def evaluate_sources(stage: Stage, valid: dict[str, PackedShardDataset], weights: dict[str, float], samples: int,
                     micro_batch: int, per_source: bool) -> dict[str, float]:
    """``eval/loss`` and ``eval/ppl``: the weighted mean over the sources' validation losses (with one
    source, its loss); ``per_source`` adds ``eval/<name>/loss`` and ``eval/<name>/ppl``."""
    losses = {name: evaluate(stage, data, samples, micro_batch) for name, data in valid.items()}
    total = sum(weights[n] * loss for n, loss in losses.items()) / sum(weights[n] for n in losses)
    out = {"eval/loss": total, "eval/ppl": math.exp(min(total, 50.0))}
    if per_source:
        for name, loss in losses.items():
            out.update({f"eval/{name}/loss": loss, f"eval/{name}/ppl": math.exp(min(loss, 50.0))})
    return out


def source_counts(sampler: ConsumedSamplesSampler) -> dict[str, float]:
    """``data/<name>/samples`` and ``data/<name>/epochs`` consumed so far, per source."""
    return {f"data/{name}/{k}": v[k] for name, v in sampler.blend.report(sampler.consumed).items()
            for k in ("samples", "epochs")}


def injected_nan(loss: torch.Tensor, step: int, steps: list[int] | None) -> torch.Tensor:
    """The test hook ``train.inject_nan_steps``: rank 0's loss of those steps reads NaN while its
    gradients stay finite, so only the trainer's own check can keep the step from being applied."""
    if steps and step in steps and distributed.rank() == 0:
        return loss + math.nan
    return loss


def backward_and_step(engine, loss: torch.Tensor, finite: torch.Tensor, boundary: bool) -> bool:
    """Backward and DeepSpeed step of one micro-batch; True when, at the accumulation boundary, the
    optimizer step was skipped because some rank saw a non-finite loss in this step (``finite``).

    The ranks agree with one all-reduce, so all skip together.  A skipped step backpropagates NaN on
    purpose: DeepSpeed's overflow check (the same on every ZeRO-3 rank) then drops the accumulated
    gradients and leaves weights, Adam moments and the LR schedule untouched."""
    skip = boundary and bool(distributed.all_reduce_sum((~finite).float()).item() > 0)
    engine.backward(loss * math.nan if skip else loss)
    engine.step()
    if skip and engine.was_step_applied():
        raise TrainingError("DeepSpeed applied an optimizer step the ranks agreed to skip (non-finite loss); "
                            "stopping before anything is saved")
    return skip


def _datasets(cfg: RunConfig, manifests: list[dict]):
    """The blended training windows, the validation sets (every source's or none, as plan checked)
    and this rank's sampler over the blend."""
    sources = cfg.data.blend
    train = BlendedDataset([PackedShardDataset(s.path, "train", cfg.data.seq_len) for s in sources])
    valid = {s.name: PackedShardDataset(s.path, "valid", cfg.data.seq_len)
             for s, m in zip(sources, manifests) if m["shards"]["valid"]}
    blend = Blend(tuple(s.name for s in sources), tuple(len(d) for d in train.parts), tuple(s.weight for s in sources))
    sampler = ConsumedSamplesSampler(blend, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                     distributed.rank(), distributed.world_size(), cfg.train.seed)
    return train, valid, sampler


def train_step(stage: Stage, train: BlendedDataset, micro_batches: list, step: int,
               inject_nan_steps: list[int] | None) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimizer step over this rank's micro-batches: the mean of each loss term (still on the
    device: no sync per micro-batch) and whether the ranks agreed to skip it (non-finite loss)."""
    sums: dict[str, torch.Tensor] = defaultdict(float)
    finite = torch.ones((), dtype=torch.bool, device=distributed.device())
    for i, indices in enumerate(micro_batches):
        input_ids, labels = (t.to(distributed.device()) for t in collate(train, indices))
        terms = stage.loss(input_ids, labels)
        terms["loss"] = injected_nan(terms["loss"], step + 1, inject_nan_steps)
        finite &= torch.isfinite(terms["loss"].detach())
        skipped = backward_and_step(stage.engine, terms["loss"], finite, i == len(micro_batches) - 1)
        for k, v in terms.items():
            sums[k] = sums[k] + v.detach().float() / len(micro_batches)
    return sums, skipped


def step_metrics(stage: Stage, sums: dict[str, torch.Tensor], lr: float, tokens: int, tokens_per_s: float,
                 bad_steps: int, peak_flops: float) -> dict:
    """The logged scalars of a step: loss terms averaged over ranks, LR, throughput, MFU, gradient
    norm, peak memory."""
    out = {f"loss/{k}" if k != "loss" else "loss/total": v for k, v in
           distributed.all_reduce_mean({k: v.item() for k, v in sums.items()}).items()}
    grad_norm = stage.engine.get_global_grad_norm()
    out.update({"lr": lr, "tokens": tokens, "tokens_per_s": tokens_per_s, "bad_steps": bad_steps,
                "mfu": tokens_per_s * stage.flops_per_token / peak_flops,
                "grad_norm": float(grad_norm) if grad_norm is not None else math.nan})
    if distributed.device().type == "cuda":
        out["mem/peak_gib"] = torch.cuda.max_memory_allocated(distributed.device()) / 2**30
    return out


def _resume(checkpointer: Checkpointer, engine, sampler: ConsumedSamplesSampler) -> tuple[str | None, int, int, int]:
    """Where this launch starts: the newest resumable checkpoint's (tag, step, tokens, bad steps),
    engine and sampler restored from it; (None, 0, 0, 0) for a fresh start."""
    tag = checkpointer.find_resumable()
    if tag is None:
        return None, 0, 0, 0
    state = checkpointer.load(engine, tag)
    sampler.load_state_dict(state["sampler"])
    return tag, state["step"], state["tokens"], state.get("bad_steps", 0)


def fit(stage: Stage, p: Plan, checkpointer: Checkpointer, stop: StopSignal) -> dict:
    """Train ``stage`` to ``p.total_steps``; returns the last logged metrics."""
    cfg = p.cfg
    per_source = cfg.data.sources is not None  # data.path alone logs what it always did
    train, valid, sampler = _datasets(cfg, p.manifests)
    tag, step, tokens, bad_steps = _resume(checkpointer, stage.engine, sampler)
    bad_in_a_row = 0
    log = MetricsLogger(cfg.train.out_dir, distributed.rank() == 0, p.total_steps, step, cfg.train.progress,
                        stage.name)
    if tag is not None:
        log.resumed(tag, step, sampler.consumed)
    peak = device_peak_flops(cfg.train.peak_tflops) * distributed.world_size()
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    last: dict = {}
    window_time, window_steps = 0.0, 0  # training time only: evaluation and saving excluded
    stage.engine.train()  # dropout on from the first step (from_pretrained hands models over in eval mode)

    while step < p.total_steps:
        start = time.perf_counter()
        lr = stage.engine.get_lr()[0]  # this step's (the scheduler moves on inside the step)
        sums, skipped = train_step(stage, train, sampler.next_batch(), step, cfg.train.inject_nan_steps)
        step += 1
        bad_steps += skipped
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        if skipped:
            log.message(f"ted-ds: step {step}: non-finite loss, optimizer step skipped ({bad_in_a_row} in a row)")
        if bad_in_a_row >= cfg.train.max_bad_steps:
            raise TrainingError(f"{bad_in_a_row} steps in a row with a non-finite loss (train.max_bad_steps), "
                                f"last at step {step}; the last good checkpoint is kept: lower optim.lr or check "
                                "the data, then re-run to resume")
        tokens += tokens_per_step
        window_steps += 1
        window_time += time.perf_counter() - start

        if step % cfg.train.log_interval == 0 or step == p.total_steps:
            last = step_metrics(stage, sums, lr, tokens, window_steps * tokens_per_step / window_time, bad_steps,
                                peak)
            if per_source:
                last.update(source_counts(sampler))
            log.log(step, last)
            window_time, window_steps = 0.0, 0
        if valid and (step % cfg.train.eval_interval == 0 or step == p.total_steps):
            scores = evaluate_sources(stage, valid, dict(zip(sampler.blend.names, sampler.blend.weights)),
                                      cfg.data.eval_samples, cfg.train.micro_batch_size, per_source)
            last.update(scores)
            log.log(step, scores)
            log.message(f"step {step}: eval loss {scores['eval/loss']:.4f}, ppl {scores['eval/ppl']:.2f}")
        log.advance(step, f"loss {float(sums['loss']):.4f} (rank 0)")
        stopping = stop.agreed()
        if step % cfg.train.save_interval == 0 or step == p.total_steps or stopping:
            checkpointer.save(stage.engine, step, {"step": step, "tokens": tokens, "bad_steps": bad_steps,
                                                   "sampler": sampler.state_dict()})
            stopping = stopping or stop.agreed()  # a signal during the save: this checkpoint is the last
        if stopping:
            log.message(f"ted-ds: {stop.received or 'a peer signal'} received; saved step {step} and exiting "
                        "(re-run the same command to resume)")
            break
    log.close()
    return dict(last, step=step, stopped=step < p.total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_stage(cfg: RunConfig, filters_for: str | None = None) -> tuple[Stage, Plan, dict]:
    """A whole command: check, start the process group, build, train (or resume), write outputs.

    ``filters_for`` = "teacher" | "student" runs TED stage 1; None runs ``distill.method``.
    """
    stop = StopSignal()  # from the very start: a warning during set-up is honoured after the first step
    p = plan(cfg, filters_for=filters_for)
    ds = resolve_ds_config(cfg, distributed.expected_world_size())  # every check happens before the process group
    check_fits(p, ds, distributed.expected_world_size(), distributed.local_world_size(),
               with_teacher=cfg.uses_teacher or filters_for == "teacher",
               trained_heads=len(p.pairs) if filters_for and cfg.distill.filter_head == "trainable" else 0)
    distributed.init(cfg.train.timeout_minutes)
    if distributed.rank() == 0 and p.vocabularies:
        print(f"ted-ds: {p.vocabularies}", file=sys.stderr)  # the sizes the checks compared
    seed_everything(cfg.train.seed)
    stage = build_filter_learning(p, ds, filters_for) if filters_for else build_distill(p, ds)
    if distributed.rank() == 0:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.train.out_dir, "config.yaml"))
    identity = {"stage": stage.name, "vocab_sha256": p.manifest["tokenizer"]["vocab_sha256"],
                "student_layers": p.student_config.num_hidden_layers,
                "student_hidden": p.student_config.hidden_size, "taps": [list(x) for x in p.pairs],
                "seq_len": cfg.data.seq_len, "global_batch_size": cfg.train.global_batch_size}
    bank = stage.trained_model if filters_for else stage.trained_model.filters
    run_info = {"config": to_dict(cfg), "student_config": p.student_config.to_dict(),
                "filters": bank.meta() if bank is not None else None,
                "tokenizer": os.path.abspath(os.path.join(cfg.data.blend[0].path, "tokenizer"))}
    ckpt = Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints", stage.name), cfg.train.keep_last, identity,
                        run_info)
    result = fit(stage, p, ckpt, stop)
    if not result["stopped"]:
        result["output"] = save_trained_outputs(stage, p, cfg.train.out_dir)
    return stage, p, result
