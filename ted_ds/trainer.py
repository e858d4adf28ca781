"""The training loop shared by every recipe: sample, forward/backward, step, log, evaluate, save.

The loop knows nothing of TED: a ``TrainModule`` (ted_ds.recipes) gives it the engine and the loss of
one micro-batch.  Resume is automatic from ``<out_dir>/checkpoints/latest``; SIGTERM/SIGUSR1
(SLURM's warnings before preemption or the time limit) make every rank save and exit cleanly.
``training_data`` and ``train_step`` are the run's own data and step; the benchmarks
(bench/mp_engine_bench.py) time them, not a copy.  ``ted_ds.run`` sets a command up and calls ``fit``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch
from torch.autograd.profiler import record_function

from ted_ds import distributed
from ted_ds.cache.ahead import RowsAhead
from ted_ds.checkpoint import Checkpointer, TrainerState
from ted_ds.crosstok import CrossTokenizer
from ted_ds.data import (
    Blend,
    BlendedDataset,
    ConsumedSamplesSampler,
    DamagedWindow,
    MicroBatch,
    PackedShardDataset,
    collate,
)
from ted_ds.errors import TrainingError
from ted_ds.evaluate import bits_per_byte, window_bytes
from ted_ds.metrics import MetricsLogger, device_peak_flops
from ted_ds.plan import Plan
from ted_ds.recipes import TrainModule

# A launcher a rank may run under: the name of its script or module in the launcher's command line.
LAUNCHERS = frozenset({"deepspeed", "torchrun", "deepspeed.launcher.launch", "torch.distributed.run",
                       "torch.distributed.launch"})


def launched_program(cmdline: list[str]) -> str:
    """The script or module a command line runs: ``python -u -m mod ...`` → mod, ``python /bin/x ...`` → x."""
    args = cmdline[1:] if cmdline and os.path.basename(cmdline[0]).startswith("python") else cmdline
    for i, arg in enumerate(args):
        if arg == "-m":
            return args[i + 1] if i + 1 < len(args) else ""
        if not arg.startswith("-"):
            return os.path.basename(arg)
    return ""


def launcher_chain(pid: int) -> list[tuple[int, int]]:
    """``(process, its parent)`` from rank ``pid`` up through the launchers above it (``deepspeed`` starts
    ``deepspeed.launcher.launch``, which starts the ranks); empty for a rank no launcher started."""
    chain, proc = [], psutil.Process(pid)
    parent = proc.parent()
    while parent is not None and launched_program(command_line(parent)) in LAUNCHERS:
        chain.append((proc.pid, parent.pid))
        proc, parent = parent, parent.parent()
    return chain


def command_line(proc: psutil.Process) -> list[str]:
    """``proc``'s command line; empty for one this user may not read, or that is gone."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def launcher_gone(chain: list[tuple[int, int]]) -> bool:
    """A process of the chain has lost its parent: a launcher above this rank died (a dead parent's
    children are re-parented at once, before anyone reaps it)."""
    try:
        return any(psutil.Process(pid).ppid() != parent for pid, parent in chain)
    except psutil.NoSuchProcess:
        return True


def stop_when_launcher_dies(poll_s: float = 1.0) -> None:
    """A SIGTERM to the launcher's PID alone (a user's ``kill``, a scheduler without process groups) kills
    the ``deepspeed`` runner but not the ranks under it: a watcher thread sends this rank the SIGTERM it
    would have got, so it saves and exits as on any SIGTERM."""
    chain = launcher_chain(os.getpid())

    def watch() -> None:
        while not launcher_gone(chain):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    if chain:
        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


class StopSignal:
    """Remembers that SIGTERM/SIGUSR1 arrived (or the launcher died: stop_when_launcher_dies); the loop saves
    and exits at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        stop_when_launcher_dies()

    def restore(self) -> None:
        """The handlers from before: a run in a longer process (a test, a scenario launch) leaves none behind."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The signal any rank got, the same on every rank (one collective), or None: rank 0 names the
        signal even when only a peer got it (the launcher's SIGTERM reaches the ranks one by one)."""
        got = torch.tensor([float(self.received == s.name) for s in self.SIGNALS], device=distributed.device())
        counts = distributed.all_reduce_sum(got).tolist()
        return next((s.name for s, n in zip(self.SIGNALS, counts) if n > 0), None)


@torch.no_grad()
def evaluate(recipe: TrainModule, valid: PackedShardDataset, samples: int, micro_batch: int,
             window_bytes: Callable[[int], int] | None = None) -> tuple[float, float | None]:
    """Mean eval loss per token over the first ``samples`` validation windows, split evenly over ranks
    (every rank runs the same number of forwards, as ZeRO-3 needs), and their bits per byte (None without
    ``window_bytes``: a window's index → the UTF-8 bytes its targets spell, ted_ds.evaluate.window_bytes)."""
    world = distributed.world_size()
    n = max(world, min(samples, len(valid)) // world * world)
    mine = list(range(distributed.rank(), n, world))
    recipe.engine.eval()
    total = torch.zeros(3, dtype=torch.float64, device=distributed.device())  # nats, tokens, bytes
    for i in range(0, len(mine), micro_batch):
        window = [j % len(valid) for j in mine[i:i + micro_batch]]
        input_ids, labels = (t.to(distributed.device()) for t in collate(valid, window))
        loss = recipe.eval_loss(input_ids, labels)
        nbytes = sum(map(window_bytes, window)) if window_bytes is not None else 0
        total += torch.tensor([loss.item() * labels.numel(), labels.numel(), nbytes], dtype=torch.float64,
                              device=distributed.device())
    recipe.engine.train()
    nll, tokens, nbytes = distributed.all_reduce_sum(total).tolist()
    return nll / tokens, (bits_per_byte(nll, nbytes) if window_bytes is not None else None)


def evaluate_sources(recipe: TrainModule, valid: dict[str, PackedShardDataset], weights: dict[str, float], samples: int,
                     micro_batch: int, per_source: bool,
                     window_bytes: dict[str, Callable[[int], int]] | None = None) -> dict[str, float]:
    """The eval scores (``eval_scores``) of the sources' validation splits."""
    nbytes = window_bytes or {}
    scores = {name: evaluate(recipe, data, samples, micro_batch, nbytes.get(name)) for name, data in valid.items()}
    return eval_scores(scores, weights, per_source)


def eval_scores(scores: dict[str, tuple[float, float | None]], weights: dict[str, float],
                per_source: bool) -> dict[str, float]:
    """``eval/loss``, ``eval/ppl`` and ``eval/bits_per_byte`` (when every source has it: it compares runs of
    different tokenizers) from each source's (loss, bits per byte): their weighted means (with one source,
    its scores); ``per_source`` adds ``eval/<name>/loss``, ``.../ppl`` and ``.../bits_per_byte``."""
    weigh = lambda k: sum(weights[n] * s[k] for n, s in scores.items()) / sum(weights[n] for n in scores)
    named = {"": (weigh(0), weigh(1) if all(s[1] is not None for s in scores.values()) else None)}
    if per_source:
        named.update({f"{name}/": s for name, s in scores.items()})
    out = {}
    for prefix, (loss, bpb) in named.items():
        out.update({f"eval/{prefix}loss": loss, f"eval/{prefix}ppl": math.exp(min(loss, 50.0))})
        if bpb is not None:
            out[f"eval/{prefix}bits_per_byte"] = bpb
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
    with record_function("backward"):
        engine.backward(loss * math.nan if skip else loss)
    with record_function("step"):  # ZeRO-3's gradient reduction and the optimizer, at the boundary
        engine.step()
    if skip and engine.was_step_applied():
        raise TrainingError("DeepSpeed applied an optimizer step the ranks agreed to skip (non-finite loss); "
                            "stopping before anything is saved")
    return skip


def train_step(recipe: TrainModule, batches: list[MicroBatch], step: int = 0,
               nan_steps: list[int] | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimizer step (number ``step``) over this rank's micro-batches of one global batch.  Returns
    the loss terms averaged over the micro-batches (still on the device: no sync) and whether the step was
    skipped for a non-finite loss (backward_and_step)."""
    sums: dict[str, torch.Tensor] = defaultdict(float)
    finite = torch.ones((), dtype=torch.bool, device=distributed.device())
    for i, batch in enumerate(batches):
        with record_function("forward"):
            terms = recipe.loss(batch, max(step - 1, 0))  # the 0-based step, as the schedules count
        terms["loss"] = injected_nan(terms["loss"], step, nan_steps)
        finite &= torch.isfinite(terms["loss"].detach())
        skipped = backward_and_step(recipe.engine, terms["loss"], finite, i == len(batches) - 1)
        for k, v in terms.items():  # no .item() here: no device sync per micro-batch
            sums[k] = sums[k] + v.detach().float() / len(batches)
    return sums, skipped


@dataclass
class TrainData:
    """What a recipe trains and evaluates on: the sources' train splits in one index space, their
    validation splits (every source or none: plan checks), the blend and the sampler over it."""

    train: BlendedDataset
    valid: dict[str, PackedShardDataset]
    blend: Blend
    sampler: ConsumedSamplesSampler
    cross: CrossTokenizer | None = None  # distill.cross_tokenizer: each micro-batch's teacher view
    valid_bytes: dict[str, Callable[[int], int]] = field(default_factory=dict)  # source → window → its bytes
    cache: RowsAhead | None = None  # teacher.cache: the teacher's rows of each micro-batch, read ahead

    def next_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch, on the device, with their sample indices (and
        the teacher's view across tokenizers, or its cached rows).  A damaged window on any rank stops every
        rank with its line (raise_on_every_rank)."""
        micro = self.sampler.next_batch()
        try:
            windows, damage = [collate(self.train, indices) for indices in micro], None
        except DamagedWindow as e:
            windows, damage = [], str(e)
        raise_on_every_rank(damage)
        device = distributed.device()
        view = lambda pair: None if self.cross is None else self.cross.batch(*pair).to(device)
        rows = [None] * len(micro) if self.cache is None else [
            tuple(x if x is None else x.to(device) for x in r) for r in self.cache.take(micro, self.sampler.upcoming())]
        return [MicroBatch(*(t.to(device) for t in pair), indices, view(pair), r)
                for pair, indices, r in zip(windows, micro, rows)]


def raise_on_every_rank(problem: str | None) -> None:
    """One all-reduce: if any rank found a problem, every rank raises the first one (by rank), instead of
    the others waiting for a peer that is gone."""
    flag = torch.tensor([1.0 if problem else 0.0], device=distributed.device())
    if distributed.all_reduce_sum(flag).item() > 0:
        raise DamagedWindow(next(p for p in distributed.gather_objects(problem) if p))


def training_data(p: Plan) -> TrainData:
    """The run's sources as ``TrainData``, the sampler dealing this rank's share from the first sample."""
    cfg = p.cfg
    sources = cfg.data.blend
    train = BlendedDataset([PackedShardDataset(s.path, "train", cfg.data.seq_len) for s in sources])
    valid = {s.name: PackedShardDataset(s.path, "valid", cfg.data.seq_len)
             for s, m in zip(sources, p.manifests) if m["shards"]["valid"]}
    blend = Blend(tuple(s.name for s in sources), tuple(len(d) for d in train.parts), tuple(s.weight for s in sources))
    sampler = ConsumedSamplesSampler(blend, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                     distributed.rank(), distributed.world_size(), cfg.train.seed)
    return TrainData(train, valid, blend, sampler, p.cross, valid_window_bytes(sources, valid), cached_rows(p))


def valid_window_bytes(sources, valid: dict[str, PackedShardDataset]) -> dict[str, Callable[[int], int]]:
    """Each validation split's window → its bytes (bits per byte in the eval), for sources whose shards
    carry their tokenizer."""
    from data_prep.tokenizer import load_tokenizer

    dirs = {s.name: os.path.join(s.path, "tokenizer") for s in sources}
    return {name: window_bytes(data, load_tokenizer(dirs[name])) for name, data in valid.items()
            if os.path.isdir(dirs[name])}


def cached_rows(p: Plan) -> RowsAhead | None:
    """The teacher cache's rows of the run's training samples (``teacher.cache``), read ahead; None without."""
    cfg = p.cfg
    if not cfg.logits_from_cache:
        return None
    from ted_ds.cache.format import CacheRows, source_key

    return RowsAhead(CacheRows(cfg.teacher.cache, p.cache, [source_key(s.path)[0] for s in cfg.data.blend],
                               cfg.teacher.logits_topk, tail=cfg.tail_temperature is not None))


def report_skipped(state: TrainerState, max_bad_steps: int, log: MetricsLogger) -> None:
    """Say that the last step was skipped; too many in a row stop the run (the last good checkpoint is kept)."""
    step, in_a_row = state.step, state.bad_in_a_row
    log.message(f"ted-ds: step {step}: non-finite loss, optimizer step skipped ({in_a_row} in a row)")
    if in_a_row >= max_bad_steps:
        raise TrainingError(f"{in_a_row} steps in a row with a non-finite loss (train.max_bad_steps), "
                            f"last at step {step}; the last good checkpoint is kept: lower optim.lr or check "
                            "the data, then re-run to resume")


def resume(recipe: TrainModule, checkpointer: Checkpointer, state: TrainerState) -> str | None:
    """Engine and ``state`` from the latest resumable checkpoint, if any; returns its tag."""
    tag = checkpointer.agreed_resumable()
    if tag is not None:
        checkpointer.load(recipe.engine, tag, state)
    return tag


def step_metrics(recipe: TrainModule, sums: dict[str, torch.Tensor], lr: float, state: TrainerState,
                 tokens_per_s: float, peak_flops: float | None) -> dict:
    """What a logged step reports: the loss terms averaged over ranks, the loss weights of the step, LR,
    throughput, MFU, grad norm."""
    losses = distributed.all_reduce_mean({k: v.item() for k, v in sums.items()})
    out = {f"loss/{k}" if k != "loss" else "loss/total": v for k, v in losses.items()}
    out.update({f"weight/{k}": v for k, v in recipe.weights_at(state.step - 1).items()})
    grad_norm = recipe.engine.get_global_grad_norm()
    out.update({"lr": lr, "tokens": state.tokens, "tokens_per_s": tokens_per_s, "bad_steps": state.bad_steps,
                "grad_norm": float(grad_norm) if grad_norm is not None else math.nan})
    if peak_flops is not None:  # None: a GPU without a datasheet peak (ted_ds.metrics.device_peak_flops)
        out["mfu"] = tokens_per_s * recipe.flops_per_token / peak_flops
    if distributed.device().type == "cuda":
        out["mem/peak_gib"] = torch.cuda.max_memory_allocated(distributed.device()) / 2**30
    return out


def due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns, and ``run.run_recipe`` with the path of the outputs it saved."""

    metrics: dict[str, float]  # the last logged step's metrics and eval scores (empty: nothing was trained)
    step: int  # the step reached
    stopped: bool  # a signal stopped the run before its last step (a re-run resumes)
    finished_before: bool  # the run had reached its last step before this launch (nothing trained)
    output: str | None = None  # what the recipe saved once trained (run_recipe); None when stopped


def fit(recipe: TrainModule, p: Plan, checkpointer: Checkpointer, stop: StopSignal,
        changed: dict[str, tuple] | None = None) -> FitResult:
    """Train ``recipe`` (from recipes.build_recipe) to ``p.total_steps``; returns the last logged metrics and
    where the run stands (``FitResult``).  ``changed``: the safe config keys this launch changed
    (run.owned_config), recorded on resume."""
    cfg, total = p.cfg, p.total_steps
    per_source = cfg.data.sources is not None  # data.path alone logs what it always did
    data = training_data(p)
    state = TrainerState(data.sampler)
    tag = resume(recipe, checkpointer, state)
    log = MetricsLogger(cfg.train.out_dir, distributed.rank() == 0, total, state.step, cfg.train.progress,
                        recipe.name)
    if tag is not None:
        log.resumed(tag, state.step, state.sampler.consumed, changed or {})
    finished_before = state.step >= total
    dtype = next(recipe.trained_model.parameters()).dtype  # the run's compute dtype (engine.check_dtype)
    peak = device_peak_flops(cfg.train.peak_tflops, distributed.device(), dtype)
    peak = peak * distributed.world_size() if peak is not None else None
    tokens_per_step = cfg.tokens_per_step
    last: dict = {}
    window_time, window_steps = 0.0, 0  # training time only: evaluation and saving excluded

    while state.step < total:
        start = time.perf_counter()
        lr = recipe.engine.get_lr()[0]  # this step's (the scheduler moves on inside the step)
        sums, skipped = train_step(recipe, data.next_batch(), state.step + 1, cfg.train.inject_nan_steps)
        state.advance(tokens_per_step, skipped)
        if skipped:
            report_skipped(state, cfg.train.max_bad_steps, log)
        window_steps += 1
        window_time += time.perf_counter() - start

        if due(state.step, cfg.train.log_interval, total):
            last = step_metrics(recipe, sums, lr, state, window_steps * tokens_per_step / window_time, peak)
            if per_source:
                last.update(source_counts(data.sampler))
            log.log(state.step, last)
            window_time, window_steps = 0.0, 0
        evaluating = due(state.step, cfg.train.eval_interval, total) or state.step in cfg.train.eval_steps
        if data.valid and evaluating:
            scores = evaluate_sources(recipe, data.valid, dict(zip(data.blend.names, data.blend.weights)),
                                      cfg.data.eval_samples, cfg.train.micro_batch_size, per_source, data.valid_bytes)
            last.update(scores)
            log.log(state.step, scores)
            bpb = f", bits/byte {scores['eval/bits_per_byte']:.4f}" if "eval/bits_per_byte" in scores else ""
            log.message(f"step {state.step}: eval loss {scores['eval/loss']:.4f}, ppl {scores['eval/ppl']:.2f}{bpb}")
        log.advance(state.step, f"loss {float(sums['loss']):.4f} (rank 0)")
        stopping = stop.agreed()
        if due(state.step, cfg.train.save_interval, total) or stopping:
            checkpointer.save(recipe.engine, state)
            stopping = stopping or stop.agreed()  # a signal during the save: this checkpoint is the last
        if stopping:
            log.message(f"ted-ds: {stopping} received; saved step {state.step} and exiting "
                        "(re-run the same command to resume)")
            break
    log.close()
    return FitResult(last, state.step, stopped=state.step < total, finished_before=finished_before)
