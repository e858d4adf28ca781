"""Checkpoints that survive crashes: complete-or-invisible saves, exact resume, keep-last-K.

Layout of ``<out_dir>/checkpoints``::

    step-00000100/            DeepSpeed's files (ZeRO-3 shards, optimizer, scheduler) + ours:
        trainer_state.json    step, tokens, consumed samples, world size, run config, recipe
        rng_rank{r}.pt        every RNG of rank r (torch CPU, CUDA per local device, numpy, python), tensors only
        COMPLETE              written last: every file the ranks wrote, with its size
    latest                    the tag of the newest COMPLETE checkpoint (atomic rename)

A save writes everything, gathers what every rank wrote, then rank 0 writes ``COMPLETE`` and only
then moves ``latest``.  A crash mid-save leaves the previous checkpoint as ``latest``.  Loading checks
``COMPLETE`` against the files and falls back to the newest older checkpoint that passes, with
a warning.  Every rank reads its own files, so every node must see the same directory: before a
resume the ranks compare what they see, and refuse to start if they differ.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import random
import shutil
import socket
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from data_prep.fileio import atomically, write_text
from ted_ds import distributed
from ted_ds.config import RunConfig, config_changes, run_config_from_dict
from ted_ds.errors import CheckpointError, TrainingError

if TYPE_CHECKING:
    from ted_ds.data import ConsumedSamplesSampler

TAG_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"  # ours, in every tag directory: see the layout above
DISTILL_PREFIX = "distill-"  # checkpoints/distill-<method>: a student is in it (stage 1's are filters-<model>)
CONVERSION_WAIT = datetime.timedelta(hours=6)  # the others wait this long for rank 0 to convert a checkpoint
# (a dead rank 0 ends the wait at once, see distributed.rank0_alone: only a hung one is waited for this long)


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def distill_recipe(method: str) -> str:
    """The recipe name (and ``checkpoints/`` directory) of a run of ``distill.method``."""
    return f"{DISTILL_PREFIX}{method}"


def holds_student(ckpt_dir: str) -> bool:
    """A recipe checkpoint directory of stage 2 or a baseline: its weights include a student."""
    return os.path.basename(os.path.normpath(ckpt_dir)).startswith(DISTILL_PREFIX)


@dataclass
class CheckpointRecord:
    """``trainer_state.json``: what ted-ds saves with a tag beside DeepSpeed's files (its keys, in this
    order, are the file's)."""

    step: int
    tokens: int
    sampler: dict  # ConsumedSamplesSampler.state_dict(): the data position
    identity: dict  # what must match on resume (model shapes, tokenizer, taps, recipe)
    run: dict  # what an offline export needs: run config, student HF config, filter bank layout, tokenizer
    world_size: int  # ranks that saved it (another count resumes through the universal format)
    tag: str
    bad_steps: int = 0  # steps skipped for a non-finite loss so far


@dataclass
class TrainerState:
    """The training loop's state, owned by the trainer and saved / restored by the ``Checkpointer`` as one
    object: the counters and the data position (the sampler); all but ``bad_in_a_row`` go into
    ``trainer_state.json``."""

    sampler: ConsumedSamplesSampler
    step: int = 0
    tokens: int = 0
    bad_steps: int = 0  # steps skipped for a non-finite loss so far
    bad_in_a_row: int = 0  # the skipped steps just before this one (a resume starts afresh)

    def advance(self, tokens: int, skipped: bool) -> None:
        """One optimizer step done (``skipped``: not applied, for a non-finite loss)."""
        self.step += 1
        self.tokens += tokens
        self.bad_steps += skipped
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0

    def record(self, identity: dict, run: dict, world_size: int, tag: str) -> CheckpointRecord:
        """What a save writes of this state, with the checkpointer's own fields."""
        return CheckpointRecord(step=self.step, tokens=self.tokens, sampler=self.sampler.state_dict(),
                                identity=identity, run=run, world_size=world_size, tag=tag, bad_steps=self.bad_steps)

    def restore(self, record: CheckpointRecord) -> None:
        """This state as ``record`` saved it: the counters, and the sampler at its data position."""
        self.sampler.load_state_dict(record.sampler)
        self.step, self.tokens, self.bad_steps, self.bad_in_a_row = record.step, record.tokens, record.bad_steps, 0


def read_record(tag_dir: str) -> CheckpointRecord:
    """The one reader of ``trainer_state.json``."""
    with open(os.path.join(tag_dir, TRAINER_STATE)) as f:
        return CheckpointRecord(**json.load(f))


def _deepspeed_safe_globals() -> list:
    """The few non-tensor classes DeepSpeed pickles into its checkpoint files."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    allowed = [ZeroStageEnum]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    return allowed


@contextlib.contextmanager
def weights_only_loads():
    """Make every ``torch.load`` inside (DeepSpeed's loaders included) use ``weights_only=True``:
    a checkpoint can then hold tensors and plain data, never code to execute."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as e:
            where = args[0] if args else kwargs.get("f")
            raise CheckpointError(f"{where}: holds Python objects other than tensors; refusing to unpickle it "
                                  f"({str(e).splitlines()[0][:160]})") from None

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def rng_state() -> dict:
    """Every generator this rank draws from (dropout masks, shuffles), as tensors only."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all(),  # one per local device; [] without CUDA
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor([x for x in random.getstate()[1]], dtype=torch.int64),
        "python_version": torch.tensor([random.getstate()[0]], dtype=torch.int64),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    _set_cuda_rng_state(state.get("cuda", []))
    pos, has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    py = state["python"].tolist()
    random.setstate((int(state["python_version"][0]), tuple(py), None))


def _set_cuda_rng_state(states: list[torch.Tensor]) -> None:
    """Restore each local device's generator; a different device count cannot be mapped, so warn."""
    if len(states) != torch.cuda.device_count():
        warnings.warn(f"checkpoint saved CUDA generators of {len(states)} local devices, this process sees "
                      f"{torch.cuda.device_count()}: CUDA random streams are not restored", stacklevel=3)
        return
    torch.cuda.set_rng_state_all(states)


@contextlib.contextmanager
def recorded_saves(checkpoint_engine, paths: list[str]):
    """Append to ``paths`` every file DeepSpeed's ``checkpoint_engine`` saves inside (all of a tag's
    shards, model and optimizer states, go through its ``save``)."""
    save = checkpoint_engine.save

    def recorded(state_dict, path):
        save(state_dict, path)
        paths.append(path)

    checkpoint_engine.save = recorded
    try:
        yield
    finally:
        checkpoint_engine.save = save


def sizes(paths: list[str], tag_dir: str) -> dict[str, int]:
    """What this rank wrote, as ``COMPLETE`` records it: each file's path in the tag and its size."""
    return {os.path.relpath(path, tag_dir): os.path.getsize(path) for path in paths}


def is_complete(tag_dir: str) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    marker = os.path.join(tag_dir, "COMPLETE")
    if not os.path.isfile(marker):
        return "no COMPLETE marker (the save did not finish)"
    try:
        with open(marker) as f:
            expected = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable COMPLETE marker"
    for rel, size in expected.items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"missing file {rel}"
        if os.path.getsize(path) != size:
            return f"{rel} is {os.path.getsize(path)} bytes, expected {size}"
    return None


def tags_newest_first(ckpt_dir: str) -> list[str]:
    """Tags on disk, newest first (completeness not yet checked)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((d for d in os.listdir(ckpt_dir) if d.startswith(TAG_PREFIX) and "." not in d), reverse=True)


def check_finite(module: torch.nn.Module, step: int) -> None:
    """Refuse to save non-finite weights: each rank checks what it holds (its ZeRO-3 partition,
    ``ds_tensor``), one all-reduce agrees.  ``latest`` then never names a NaN checkpoint."""
    finite = torch.stack([torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in module.parameters()])
    if distributed.all_reduce_sum((~finite).sum().float().reshape(1).to(distributed.device())).item() > 0:
        raise TrainingError(f"step {step}: the weights hold NaN/inf; not saving them (the last good checkpoint "
                            "stays latest)")


def agreed_tag(views: list[tuple[str, str | None, str | None]], ckpt_dir: str) -> str | None:
    """The tag every rank resumes from, given each rank's view ``(host, tag or None, problem or None)``.

    A rank that resumed alone would train on mixed weights or wait forever in a collective the others
    never reach; ranks see different checkpoints when ``train.out_dir`` is on a disk of each node's own."""
    problems = [problem for _, _, problem in views if problem]
    if problems:
        raise CheckpointError(problems[0])
    tags = {tag for _, tag, _ in views}
    if len(tags) == 1:
        return tags.pop()
    newest = max(tags, key=lambda tag: tag or "")
    blind = sorted({host for host, tag, _ in views if tag != newest})
    seeing = sorted({host for host, tag, _ in views if tag == newest})
    saw = ", ".join(sorted({tag or "no checkpoint" for _, tag, _ in views if tag != newest}))
    raise CheckpointError(f"{ckpt_dir}: {', '.join(blind)} cannot see checkpoint {newest}, which {', '.join(seeing)} "
                          f"would resume from ({saw} there): train.out_dir must be on storage every node shares")


def save_failed(ckpt_dir: str, tag: str, error: Exception) -> CheckpointError:
    """One line for a save that could not write (a full disk, most often): what failed, how much
    room is left, and that ``latest`` still names the previous checkpoint.  A rank that wrote
    its part waits for the failed one; the launcher then stops it."""
    free = shutil.disk_usage(ckpt_dir).free
    latest = os.path.join(ckpt_dir, "latest")
    previous = open(latest).read().strip() if os.path.isfile(latest) else "no checkpoint yet"
    reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__
    return CheckpointError(f"saving {os.path.join(ckpt_dir, tag)} failed ({reason}; {free / 2**20:.1f} MiB free); "
                           f"latest is still {previous}: free space and re-run to resume")


def prune(ckpt_dir: str, newest: str, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (and their universal conversions)."""
    for old in [t for t in tags_newest_first(ckpt_dir) if t < newest][max(0, keep_last - 1):]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        shutil.rmtree(os.path.join(ckpt_dir, old + ".universal"), ignore_errors=True)


class Checkpointer:
    def __init__(self, ckpt_dir: str, keep_last: int, identity: dict, run_info: dict | None = None):
        """``identity`` holds what must match on resume (model shapes, tokenizer, method, recipe);
        ``run_info`` what an offline export needs (HF config of the student, filter bank layout)."""
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.identity = identity
        self.run_info = run_info or {}

    def save(self, engine, state: TrainerState) -> str:
        """Save the engine, every RNG and the trainer's ``state`` at its step."""
        check_finite(engine.module, state.step)
        tag = tag_for(state.step)
        tag_dir = os.path.join(self.dir, tag)
        if distributed.rank() == 0 and os.path.isdir(tag_dir):
            shutil.rmtree(tag_dir)  # a partial save of the same step from a crashed attempt
        distributed.barrier()
        try:
            wrote = self._write(engine, tag_dir, state)
            # each rank reports what it wrote (a listing by rank 0 can be stale on NFS), once all have
            files = {rel: size for own in distributed.gather_objects(wrote) for rel, size in own.items()}
            if distributed.rank() == 0:
                write_text(os.path.join(tag_dir, "COMPLETE"), json.dumps({"files": dict(sorted(files.items()))},
                                                                          indent=1))
                write_text(os.path.join(self.dir, "latest"), tag)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if distributed.failed_collective(e):
                raise  # a peer is gone, not the disk: ted_ds.distributed.collective_errors names it
            raise save_failed(self.dir, tag, e) from None
        if distributed.rank() == 0:
            prune(self.dir, tag, self.keep_last)
        distributed.barrier()
        return tag

    def _write(self, engine, tag_dir: str, state: TrainerState) -> dict[str, int]:
        """This rank's part of a save: DeepSpeed's files, its RNG, and (rank 0) the trainer state;
        returns what it wrote (``sizes``)."""
        paths: list[str] = []
        with recorded_saves(engine.checkpoint_engine, paths):
            engine.save_checkpoint(self.dir, tag=os.path.basename(tag_dir), save_latest=False)
        paths.append(os.path.join(tag_dir, f"rng_rank{distributed.rank()}.pt"))
        torch.save(rng_state(), paths[-1])
        if distributed.rank() == 0:
            record = state.record(self.identity, self.run_info, distributed.world_size(), os.path.basename(tag_dir))
            paths.append(os.path.join(tag_dir, TRAINER_STATE))
            write_text(paths[-1], json.dumps(asdict(record), indent=2))
        return sizes(paths, tag_dir)

    def find_resumable(self) -> str | None:
        """The newest whole checkpoint: ``latest`` if it checks out, else the newest older one."""
        latest_path = os.path.join(self.dir, "latest")
        if not os.path.isfile(latest_path):
            return None
        with open(latest_path) as f:
            latest = f.read().strip()
        for tag in [latest] + [t for t in tags_newest_first(self.dir) if t < latest]:
            problem = is_complete(os.path.join(self.dir, tag))
            if problem is None:
                return tag
            if distributed.rank() == 0:
                warnings.warn(f"checkpoint {tag} is unusable ({problem}); trying an older one", stacklevel=2)
        raise CheckpointError(f"{self.dir}: no complete checkpoint left to resume from on {socket.gethostname()} "
                              f"({latest}: {problem}); if other nodes wrote the missing files, train.out_dir must be "
                              "on storage every node shares")

    def agreed_resumable(self) -> str | None:
        """``find_resumable`` on every rank, compared in one gather: the tag all ranks see (``agreed_tag``)."""
        try:
            view = (socket.gethostname(), self.find_resumable(), None)
        except CheckpointError as e:
            view = (socket.gethostname(), None, str(e))
        return agreed_tag(distributed.gather_objects(view), self.dir)

    def checked_record(self, tag: str) -> CheckpointRecord:
        """``tag``'s record, refused in one line if it was written by a run of another identity."""
        record = read_record(os.path.join(self.dir, tag))
        for key, value in self.identity.items():
            if record.identity.get(key) != value:
                raise CheckpointError(
                    f"checkpoint {os.path.join(self.dir, tag)} was written with {key}={record.identity.get(key)!r}, "
                    f"this run has {value!r}; use another train.out_dir or the matching config")
        return record

    def load(self, engine, tag: str, state: TrainerState) -> None:
        """Restore engine, RNG and the trainer's ``state`` from ``tag``.

        A checkpoint written by another number of ranks is converted once to DeepSpeed's universal
        format (``<tag>.universal``, per-parameter fp32 weights and Adam moments) and loaded from
        there, re-partitioned for this world size.
        """
        record = self.checked_record(tag)
        load_tag = tag
        universal = record.world_size != distributed.world_size()
        groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
        hyper = [{k: v for k, v in g.items() if k in ("weight_decay", "betas", "eps")} for g in groups]
        if universal:
            load_tag = self._universal(tag, record.world_size)
            engine._config.load_universal_checkpoint = True
        try:
            with weights_only_loads():
                load_dir, _ = engine.load_checkpoint(self.dir, tag=load_tag, load_module_strict=True,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if universal:
            # DeepSpeed's universal ZeRO-3 loader copies param group 0's hyperparameters onto every
            # group, which would start decaying norms and biases: put each group's own back.
            # It also gives every parameter group the SAME step-count tensor, which torch's AdamW
            # increments in place once per group: each group needs its own copy.
            for group, own in zip(groups, hyper):
                group.update(own)
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            for param_state in inner.state.values():
                if "step" in param_state:
                    param_state["step"] = torch.tensor(float(param_state["step"]))
        if load_dir is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {load_tag} from {self.dir}")
        rng_path = os.path.join(self.dir, tag, f"rng_rank{distributed.rank()}.pt")
        if record.world_size == distributed.world_size() and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
        state.restore(record)

    def _universal(self, tag: str, saved_by: int) -> str:
        """Convert ``tag`` (saved by ``saved_by`` ranks) to the universal format, once; returns the
        universal tag.  Rank 0 converts alone while the others wait up to ``CONVERSION_WAIT``
        (``distributed.rank0_alone``), not train.timeout_minutes: the conversion reads and writes the
        whole student, and on slow shared storage that can outlast any collective timeout.  Sharing the
        work instead would mean splitting DeepSpeed's converter by parameter across ranks."""
        universal = tag + ".universal"
        target = os.path.join(self.dir, universal)

        def convert() -> None:
            if os.path.isdir(target):
                return
            from argparse import Namespace

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            print(f"ted-ds: converting {tag} from world size {saved_by} to {distributed.world_size()}; the other "
                  f"ranks wait for it (up to {CONVERSION_WAIT})", file=sys.stderr, flush=True)
            with atomically(target) as tmp, weights_only_loads():
                ds_to_universal(Namespace(input_folder=os.path.join(self.dir, tag), output_folder=tmp,
                                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                          strict=True, inject_missing_state=False))

        distributed.rank0_alone(convert, CONVERSION_WAIT)
        return universal


def saved_record(ckpt_dir: str) -> CheckpointRecord | None:
    """The record of the newest whole checkpoint of ``ckpt_dir``, read before any process group
    (None: nothing to resume); ``Checkpointer.agreed_resumable`` makes the ranks agree on it later."""
    for tag in tags_newest_first(ckpt_dir):
        if is_complete(os.path.join(ckpt_dir, tag)) is None:
            return read_record(os.path.join(ckpt_dir, tag))
    return None


def owned_config_changes(record: CheckpointRecord, cfg: RunConfig, ckpt_dir: str) -> dict[str, tuple]:
    """A run owns its config: the keys a relaunch changed, as ``key → (old, new)``, if all are safe to
    change (``config.SAFE_TO_CHANGE``); a change to what is trained is refused in one line naming the keys."""
    refused, allowed = config_changes(run_config_from_dict(record.run["config"]), cfg)
    if refused:
        changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise CheckpointError(
            f"{ckpt_dir} was trained to step {record.step} with another config ({changes}): a resumed run keeps its "
            f"own config, so re-run with the old values; to train on from it with the new ones on purpose, start a "
            f"new run from it: train.init_from={ckpt_dir} (instead of student.path/config/init_from_teacher) "
            "and another train.out_dir")
    return allowed


def resolve_checkpoint(path: str, tag: str | None) -> tuple[str, str]:
    """(recipe checkpoint dir, tag) from a run dir (its student's recipe if it has several), a recipe
    checkpoint dir or a tag dir; ``tag`` None means the newest whole one."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, TRAINER_STATE)):  # a tag directory
        return os.path.dirname(path), tag or os.path.basename(path)
    candidates = [path]
    root = os.path.join(path, "checkpoints")
    if os.path.isdir(root):
        candidates = [os.path.join(root, d) for d in sorted(os.listdir(root))]
        candidates = [c for c in candidates if holds_student(c)] or candidates
    candidates = [c for c in candidates if os.path.isfile(os.path.join(c, "latest"))]
    if len(candidates) != 1:
        raise CheckpointError(f"{path}: expected one checkpoint directory with a 'latest' file, found "
                              f"{len(candidates)}; pass the checkpoints/<recipe> directory itself")
    ckpt_dir = candidates[0]
    if tag is None:
        tag = Checkpointer(ckpt_dir, 1, {}).find_resumable()
    elif not os.path.isdir(os.path.join(ckpt_dir, tag)):
        have = ", ".join(sorted(tags_newest_first(ckpt_dir))) or "none"
        raise CheckpointError(f"{ckpt_dir}: no checkpoint tag {tag} (have: {have})")
    elif is_complete(os.path.join(ckpt_dir, tag)) is not None:
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)}: {is_complete(os.path.join(ckpt_dir, tag))}")
    return ckpt_dir, tag
