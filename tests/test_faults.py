"""Faults a long run meets, each with an asserted outcome and no data lost: a non-finite loss
(skipped, counted, fatal after ``train.max_bad_steps`` in a row), a NaN about to be saved, a shard
damaged after its build, a disk that fills up during ``ted-prep build`` or a checkpoint save (a
small tmpfs mounted by the test: needs root)."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import subprocess
import tempfile

import deepspeed  # noqa: F401  imported before any test: it sets PYTORCH_NVML_BASED_CUDA_CHECK
import pytest
import torch
from safetensors.torch import load_file

from harness.common import REPO, deepspeed_cmd, needs, record_fault, run_launcher
from harness.tiny import base_config, damage_token, write_config
from ted_ds.checkpoint import Checkpointer, TrainerState
from ted_ds.data import ConsumedSamplesSampler
from ted_ds.errors import TrainingError
from ted_ds.export import consolidated_state


def _cfg(tiny, root, name, **over) -> str:
    cfg = base_config(tiny["llama_data"], tiny["llama_teacher"], str(root / name),
                      **{"distill.method": "lwd", **over})
    return write_config(str(root / f"{name}.yaml"), **cfg)


def _ckpt(out_dir) -> str:
    return os.path.join(out_dir, "checkpoints", "distill-lwd")


def _weights(out_dir, step) -> dict[str, torch.Tensor]:
    return consolidated_state(_ckpt(out_dir), f"step-{step:08d}")


def _state(out_dir, tag) -> dict:
    return json.load(open(os.path.join(_ckpt(out_dir), tag, "trainer_state.json")))


def _deepspeed_state(out_dir, step, kind: str) -> list[dict]:
    """Every rank's DeepSpeed ``kind`` file (``optim_states``: ZeRO-3 Adam shards; ``model_states``) of a step."""
    from ted_ds.checkpoint import weights_only_loads

    with weights_only_loads():
        return [torch.load(p) for p in sorted(glob.glob(os.path.join(_ckpt(out_dir), f"step-{step:08d}",
                                                                     f"*_{kind}.pt")))]


def _equal(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


@pytest.mark.multirank
def test_one_nan_step_is_skipped_on_every_rank_and_counted(tiny, tmp_path):
    """Rank 0 alone reads NaN at step 3 (its gradients finite): both ranks must skip that update. Rank 1,
    whose own loss is finite, skips by the ranks' agreement (recorded per rank), not only because
    DeepSpeed later finds the NaN gradient that the agreement sends back; weights, Adam moments and the
    LR schedule come out of the skipped step as they went in."""
    out = str(tmp_path / "nan1")
    cfg = _cfg(tiny, tmp_path, "nan1", **{"train.steps": 5, "train.save_interval": 1, "train.keep_last": 5,
                                          "train.inject_nan_steps": [3]})
    record = os.path.join(REPO, "tests", "harness", "mp", "record_steps.py")
    r = run_launcher(deepspeed_cmd(2, record, "--record", str(tmp_path), "distill", "--config", cfg))
    steps = {rank: [json.loads(line) for line in open(tmp_path / f"steps-rank{rank}.jsonl")] for rank in (0, 1)}
    assert [(s["own_loss_finite"], s["skipped"], s["applied"]) for s in steps[1]] == \
        [(True, False, True)] * 2 + [(True, True, False)] + [(True, False, True)] * 2, steps[1]
    assert [(s["own_loss_finite"], s["skipped"]) for s in steps[0]][2] == (False, True)
    before, skipped, after = (_weights(out, s) for s in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before), "the NaN step changed the weights"
    assert any(not torch.equal(skipped[k], after[k]) for k in before), "training stopped updating after it"
    optim = {s: [f["optimizer_state_dict"]["optimizer_state_dict"] for f in _deepspeed_state(out, s, "optim_states")]
             for s in (2, 3, 4)}  # each rank's Adam: its step count, moments and param groups (with their LR)
    assert len(optim[3]) == 2 and _equal(optim[2], optim[3]), "the NaN step changed the Adam moments"
    assert not _equal(optim[3], optim[4])
    schedule = {s: [m["lr_scheduler"] for m in _deepspeed_state(out, s, "model_states")] for s in (2, 3, 4)}
    assert schedule[2] == schedule[3] != schedule[4], schedule
    assert "step 3: non-finite loss, optimizer step skipped (1 in a row)" in r.stderr
    final = load_file(os.path.join(out, "hf", "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())
    assert _state(out, "step-00000005")["bad_steps"] == 1 and _state(out, "step-00000002")["bad_steps"] == 0
    metrics = {m["step"]: m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "bad_steps" in m}
    assert [metrics[s]["bad_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert math.isnan(metrics[3]["loss/total"])  # rank 0's NaN shows in the logged mean
    assert metrics[4]["lr"] == metrics[3]["lr"] != metrics[5]["lr"]  # step 4 runs at the LR step 3 did not use
    record_fault("a non-finite loss on one rank at one step",
                 "`step 3: non-finite loss, optimizer step skipped (1 in a row)`; `bad_steps` counts it",
                 "weights, Adam moments and LR schedule of step 2 (no update on any rank); training goes on")


@pytest.mark.multirank
def test_nan_from_step_6_on_stops_after_max_bad_steps_and_the_run_resumes(tiny, tmp_path):
    """Steps 6, 7, 8 NaN with max_bad_steps 3: exit non-zero at step 8 with one error line, before
    its save; step 4 stays latest, finite, and a re-run without the fault resumes from it."""
    out = str(tmp_path / "nanrun")
    over = {"train.steps": 10, "train.save_interval": 4, "train.max_bad_steps": 3}
    cfg = _cfg(tiny, tmp_path, "nanrun", **over, **{"train.inject_nan_steps": list(range(6, 11))})
    cmd = deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("ted-ds: error:")]
    assert len(errors) == 1 and "3 steps in a row with a non-finite loss (train.max_bad_steps), last at step 8" \
        in errors[0], (r.stdout + r.stderr)[-3000:]
    assert open(os.path.join(_ckpt(out), "latest")).read().strip() == "step-00000004"
    assert all(torch.isfinite(v).all() for v in _weights(out, 4).values())
    assert not os.path.exists(os.path.join(out, "hf"))
    cfg = _cfg(tiny, tmp_path, "nanrun", **over)
    r = run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg))
    assert "resumed from step-00000004" in r.stderr
    assert _state(out, "step-00000010")["bad_steps"] == 0
    assert os.path.isfile(os.path.join(out, "hf", "model.safetensors"))
    record_fault(f"a non-finite loss at {over['train.max_bad_steps']} steps in a row",
                 "`" + errors[0].split("error: ", 1)[1].split(";")[0] + "`, non-zero exit",
                 "`latest` = step-00000004, finite; no checkpoint with NaN is written; the re-run resumes")


class _Engine:
    """Just enough of a DeepSpeed engine for a save that must stop before touching it."""

    def __init__(self, module):
        self.module = module


def test_weights_with_nan_are_never_saved(tmp_path):
    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 1] = math.inf
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep_last=2, identity={})
    with pytest.raises(TrainingError, match="step 7: the weights hold NaN/inf; not saving them"):
        ckpt.save(_Engine(module), TrainerState(ConsumedSamplesSampler(8, 4, 2, 0, 1, 0), step=7))
    assert not os.path.exists(tmp_path / "ckpt")


def _damage(data: str, how: str) -> str:
    """Damage train-00000 of a copy of ``data`` as ``how`` says; returns the damaged file."""
    if how == "truncated .bin":
        with open(os.path.join(data, "train-00000.bin"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 2)
        return "train-00000.bin"
    os.remove(os.path.join(data, "train-00000.idx"))
    return "train-00000.idx"


@pytest.mark.parametrize("how", ["truncated .bin", "missing .idx"])
def test_a_damaged_shard_is_named_by_verify_and_by_training_before_the_process_group(tiny, tmp_path, how, capsys,
                                                                                     monkeypatch):
    from data_prep.cli import main as prep_main
    from ted_ds import distributed
    from ted_ds.cli import main as ted_main

    data = str(tmp_path / "data")
    shutil.copytree(tiny["llama_data"], data)
    bad = _damage(data, how)
    capsys.readouterr()
    assert prep_main(["verify", data]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and bad in err, err
    monkeypatch.setattr(distributed, "init", lambda *_: pytest.fail("the process group started"))
    cfg = base_config(data, tiny["llama_teacher"], str(tmp_path / "run"), **{"distill.method": "lwd"})
    assert ted_main(["distill", "--config", write_config(str(tmp_path / "run.yaml"), **cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ted-ds: error:") and bad in err[-1], err
    record_fault(f"a shard damaged after its build ({how})",
                 f"`ted-prep verify` and training, before any process group, name `{bad}` in one line",
                 "nothing is read from the damaged dataset; the other shards are untouched")


@pytest.mark.multirank
def test_a_damaged_window_of_one_rank_stops_every_rank_with_its_line(tiny, tmp_path):
    """One token of one window rank 1 draws first, overwritten with an id past the vocabulary: both ranks
    stop at step 1 with the same line naming the shard and the window (not an IndexError in the embedding
    on one rank and "peer dead" on the other)."""
    from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset

    data = str(tmp_path / "data")
    shutil.copytree(tiny["llama_data"], data)
    window = ConsumedSamplesSampler(len(PackedShardDataset(data, "train", 32)), 8, 2, 1, 2, 1234).next_batch()[0][0]
    shard = damage_token(data, "train", window)
    cfg = base_config(data, tiny["llama_teacher"], str(tmp_path / "run"), **{"distill.method": "lwd"})
    r = run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config",
                                   write_config(str(tmp_path / "run.yaml"), **cfg)), check=False)
    log = r.stdout + r.stderr
    errors = [line for line in log.splitlines() if re.match(r"ted-ds: (rank \d+: )?error:", line)]
    assert r.returncode != 0 and "Traceback" not in log and len(errors) == 2, log[-3000:]
    messages = {e.split("error: ", 1)[1] for e in errors}
    assert len(messages) == 1, errors
    message = messages.pop()
    assert message.startswith(f"{shard}: token ") and message.endswith(
        f"(in window {window} of the train split) is id 65535, past the vocabulary of 1000: the shard is damaged; "
        f"`ted-prep verify {data}` checks every shard"), message
    record_fault("a token id past the vocabulary in one window of one rank's batch (damaged shard bytes)",
                 "every rank stops at that step with the same line naming the shard, the token and the window",
                 "nothing trained on it; `ted-prep verify` names the shard too")


def _mount_works() -> bool:
    probe = tempfile.mkdtemp()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", probe], capture_output=True)
        return mounted.returncode == 0 and subprocess.run(["umount", probe]).returncode == 0
    finally:
        os.rmdir(probe)


needs_tmpfs = needs(_mount_works(), "root to mount a small tmpfs")


@contextlib.contextmanager
def small_disk(path: str, kib: int):
    """A ``kib``-KiB tmpfs at ``path``: writes past it fail with ENOSPC, as on a full disk."""
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


def _resize(path: str, kib: int) -> None:
    """Free space the way an operator would: grow the file system, its files untouched."""
    subprocess.run(["mount", "-o", f"remount,size={kib}k", path], check=True)


def _kib(*paths: str) -> int:
    """Space the files take on disk (whole blocks, as a tmpfs counts them)."""
    return sum(os.stat(p).st_blocks // 2 for p in paths)


def _files(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def _shards(out: str) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*-*.[bi][id][nx]")))}


@needs_tmpfs
def test_disk_full_during_build_keeps_finished_shards_and_the_rerun_completes(sp_tokenizer, corpus_file, tmp_path,
                                                                              capsys):
    from data_prep.cli import main as prep_main

    def build(out):
        return prep_main(["build", "--input", corpus_file, "--tokenizer", sp_tokenizer, "--out", out,
                          "--shard-mb", "0.05", "--no-progress"])

    ref = str(tmp_path / "ref")
    assert build(ref) == 0
    total, shards = _kib(*_files(ref)), _kib(*glob.glob(os.path.join(ref, "*-*.[bi][id][nx]")))
    with small_disk(str(tmp_path / "disk"), total - shards // 2) as disk:  # room for about half the shards
        out = os.path.join(disk, "ds")
        capsys.readouterr()
        assert build(out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("ted-prep: error:") and "No space left on device" in err[-1] \
            and "finished shards kept" in err[-1], err
        state = json.load(open(os.path.join(out, ".build-state.json")))
        finished = [r["name"] for split in state["done"].values() for r in split]
        assert finished, "the disk filled before any shard finished: the test proves nothing"
        ref_shards, got = _shards(ref), _shards(out)
        assert set(got) == {f"{n}.{ext}" for n in finished for ext in ("bin", "idx")}  # no partial shard
        assert all(got[name] == ref_shards[name] for name in got)
        _resize(disk, 2 * total)
        assert build(out) == 0
        assert "resuming; finished shards kept" in capsys.readouterr().err
        assert _shards(out) == ref_shards and prep_main(["verify", out]) == 0
    record_fault("the disk fills up during `ted-prep build`", "`" + err[-1].split(": free")[0] + "`",
                 f"{len(finished)} finished shards, byte-identical; the re-run after freeing space resumes and "
                 "completes")


@needs_tmpfs
@pytest.mark.multirank
def test_disk_full_during_a_checkpoint_save_keeps_latest_and_the_rerun_resumes(tiny, tmp_path):
    """Train to a checkpoint at step 4 (NaN losses from step 5 stop that launch: a run's steps are its
    own, so the re-runs keep train.steps), shrink the room left to half a checkpoint, train on: the
    save at step 8 fails in one line, step 4 stays latest and whole; after growing the disk the
    same command resumes from step 4 and finishes."""
    from ted_ds.checkpoint import is_complete

    with small_disk(str(tmp_path / "disk"), 64 * 1024) as disk:
        out = os.path.join(disk, "run")
        cmd = lambda **over: deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", _cfg(
            tiny, tmp_path, "full", **{"train.out_dir": out, "train.steps": 8, "train.save_interval": 4, **over}))
        first = subprocess.run(cmd(**{"train.inject_nan_steps": [5, 6, 7], "train.max_bad_steps": 2}), cwd=REPO,
                               capture_output=True, text=True, timeout=600)
        assert first.returncode != 0 and open(os.path.join(_ckpt(out), "latest")).read().strip() == "step-00000004"
        used, ckpt = _kib(*_files(out)), _kib(*_files(os.path.join(_ckpt(out), "step-00000004")))
        _resize(disk, used + ckpt // 2)
        r = subprocess.run(cmd(), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode != 0
        # the rank(s) that could not write say so in one line each; a peer that wrote its part and
        # waits for them is stopped by the launcher or, first, sees them gone (one line naming the
        # collective)
        log = r.stdout + r.stderr
        errors = [line for line in log.splitlines() if re.match(r"ted-ds: (rank \d+: )?error:", line)]
        assert errors and "Traceback" not in log, log[-3000:]
        full = [e for e in errors if "step-00000008 failed" in e and "latest is still step-00000004" in e]
        assert full and all(e in full or "a peer rank is stopped, dead or unreachable" in e for e in errors), errors
        assert open(os.path.join(_ckpt(out), "latest")).read().strip() == "step-00000004"
        assert is_complete(os.path.join(_ckpt(out), "step-00000004")) is None
        _resize(disk, used + 4 * ckpt)
        r = run_launcher(cmd())
        assert "resumed from step-00000004" in r.stderr
        assert open(os.path.join(_ckpt(out), "latest")).read().strip() == "step-00000008"
    record_fault("the disk fills up during a checkpoint save (2 ranks)", "`" + full[0].split(": free space")[0] + "`",
                 "`latest` = step-00000004, complete; the re-run after freeing space resumes from it")
