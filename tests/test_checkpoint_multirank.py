"""Checkpoints under real failures: SIGKILL mid-step, SIGTERM, a crash mid-save, corruption,
resume on another rank count (exports of the same run: test_export_multirank.py).

The SIGKILL and crash-mid-save runs train a student with dropout: every step draws masks, so a
relaunch ends bit-identical to an uninterrupted run only if it restored the weights, the optimizer,
the data position AND every RNG. A relaunch that starts over also ends identical (training is
seeded), so each relaunch's own record in metrics.jsonl says which tag it resumed from and which
steps it ran; a control run that lost ``latest`` shows the difference."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from harness.common import REPO, deepspeed_cmd, last_launch, losses, record_fault, run_launcher, student_weights
from harness.tiny import STEPS, checkpointed_config, with_dropout
from ted_ds.checkpoint import is_complete

pytestmark = pytest.mark.multirank

_cfg = checkpointed_config
# the dropout runs schedule their loss weights too, both mid-change at the step-4 checkpoint: a resume must
# continue them where the run left off (α: 2 steps at 1, then 14 to 0.25; β: 1 to 0 over the whole run)
SCHEDULED = {"distill.alpha_schedule": "wsd", "distill.alpha_final": 0.25, "distill.weight_decay_fraction": 0.9,
             "distill.beta_schedule": "linear", "distill.beta_final": 0.0}


def _dropout_cfg(tiny, root, name, teacher, **over) -> str:
    return _cfg(tiny, root, name, teacher, **SCHEDULED, **over)


def _weights_follow_the_schedule(out_dir: str) -> None:
    """Every logged step's weights are the schedule's at that step, and they are the ones its loss used."""
    from ted_ds.config import DistillConfig
    from ted_ds.optim import distill_weights

    d = DistillConfig(method="lwd", **{k.split(".")[1]: v for k, v in SCHEDULED.items()})
    for m in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))):
        if "loss/total" in m:
            want = distill_weights(d, STEPS, m["step"] - 1)
            assert (m["weight/alpha"], m["weight/beta"]) == (want["alpha"], want["beta"]), m
            layer = m["loss/layer"] if want["beta"] else m.get("loss/layer", 0.0)  # β = 0: the term is not computed
            total = m["loss/lm"] + want["alpha"] * m["loss/kd"] + want["beta"] * layer
            assert m["loss/total"] == pytest.approx(total, rel=1e-5), m


def _latest(out_dir):
    path = os.path.join(out_dir, "checkpoints", "distill-lwd", "latest")
    return open(path).read().strip() if os.path.exists(path) else None


def _rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        for arg in cmd:
            if arg.startswith("--local_rank="):
                out[int(arg.split("=")[1])] = child
    return out


def _launch_and_interrupt(cmd, out_dir, when_tag, action) -> subprocess.Popen:
    """Start a launch, wait until checkpoint ``when_tag`` is latest, then ``action(rank processes)``."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _latest(out_dir) != when_tag:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    action(_rank_processes(proc))
    proc.wait(timeout=300)
    return proc


@pytest.fixture(scope="module")
def dropout_run(tiny, tmp_path_factory):
    """An uninterrupted run whose student has dropout 0.1: (root, its out_dir, the teacher it came from)."""
    root = tmp_path_factory.mktemp("ckpt-dropout")
    teacher = with_dropout(tiny["llama_teacher"], str(root / "teacher"))
    run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config",
                               _dropout_cfg(tiny, root, "ref", teacher)))
    return root, str(root / "ref"), teacher


def _relaunch_resumes_exactly(cmd, out, ref, tag):
    """Relaunch ``cmd``: it must say it resumed from ``tag``, train only the steps after it, and end with
    the uninterrupted run's weights and loss curve, bit for bit."""
    r = run_launcher(cmd)
    assert f"ted-ds: resumed from {tag}" in r.stdout + r.stderr
    assert last_launch(out) == (tag, list(range(int(tag.split("-")[1]) + 1, STEPS + 1)))
    a, b = student_weights(ref), student_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(ref)  # the whole curve: kept steps and re-run steps


def test_dropout_makes_the_resumed_runs_random(lwd_run, dropout_run):
    dropped, plain = losses(dropout_run[1]), losses(lwd_run[1])
    assert all(dropped[s] != plain[s] for s in plain)  # masks are drawn at every step, from the first


def test_sigkill_one_rank_mid_run_then_resume_is_bit_identical(tiny, dropout_run):
    root, ref, teacher = dropout_run
    cfg = _dropout_cfg(tiny, root, "killed", teacher)
    out = str(root / "killed")
    cmd = deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg)
    proc = _launch_and_interrupt(cmd, out, "step-00000004", lambda ranks: ranks[1].send_signal(signal.SIGKILL))
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "hf")), "the job must not have finished"
    stopped_at = max(losses(out))
    assert stopped_at < STEPS
    _relaunch_resumes_exactly(cmd, out, ref, "step-00000004")
    _weights_follow_the_schedule(out)
    record_fault("SIGKILL of one rank between saves (a node lost)",
                 f"the job exits with status {proc.returncode}; the re-run says `resumed from step-00000004`",
                 "`latest` = step-00000004 (the steps after it are trained again); the re-run ends bit-identical to "
                 "an uninterrupted run")


def test_sigterm_saves_and_exits_then_resume_on_one_rank(tiny, lwd_run):
    root, ref = lwd_run
    cfg = _cfg(tiny, root, "term")
    out = str(root / "term")
    cmd = deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg)

    def terminate(ranks):
        for p in ranks.values():
            p.send_signal(signal.SIGTERM)  # what SLURM sends to every task before the time limit

    proc = _launch_and_interrupt(cmd, out, "step-00000004", terminate)
    log = proc.stdout.read()
    assert "exits with return code = 75" in log, log[-3000:]  # saved and stopped: "run me again"
    assert "SIGTERM received; saved step" in log
    saved = _latest(out)
    state = json.load(open(os.path.join(out, "checkpoints", "distill-lwd", saved, "trainer_state.json")))
    step = state["step"]
    assert 4 <= step < STEPS and state["sampler"]["consumed_samples"] == step * 8
    assert not os.path.exists(os.path.join(out, "hf"))
    # resume the 2-rank checkpoint on ONE process: converted to the universal format and re-partitioned
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", cfg], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {saved}" in r.stderr and last_launch(out) == (saved, list(range(step + 1, STEPS + 1)))
    ref_losses, got = losses(ref), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # same samples in the same order, same optimizer state: equal up to float summation order
    # (1 rank accumulates 4 micro-batches where 2 ranks accumulated 2 each and averaged)
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(ref_losses[s], rel=1e-5), s
    a, b = student_weights(ref), student_weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def _fault_cmd(cfg: str, fault: str) -> list[str]:
    return deepspeed_cmd(2, os.path.join(REPO, "tests", "harness", "mp", "fault_at.py"), "--fault", fault,
                         "distill", "--config", cfg)


# Where in the save at step 8 (the 2nd) a rank dies, and what that leaves of step-00000008.
SAVE_KILLS = {
    "save-start:2:1:KILL": ("before any file of the tag is written", lambda tag: not os.path.exists(tag)),
    "save-shards:2:1:KILL": ("after DeepSpeed's shards, before the RNG files and COMPLETE",
                             lambda tag: os.path.isdir(tag) and not os.path.exists(os.path.join(tag, "COMPLETE"))),
    "save-latest:2:0:KILL": ("after COMPLETE, before `latest` moves",
                             lambda tag: is_complete(tag) is None),
}


@pytest.mark.parametrize("fault", SAVE_KILLS)
def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(tiny, dropout_run, fault):
    root, ref, teacher = dropout_run
    name = "kill-" + fault.split(":")[0]
    cfg = _dropout_cfg(tiny, root, name, teacher)
    out = str(root / name)
    proc = subprocess.run(_fault_cmd(cfg, fault), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    when, left = SAVE_KILLS[fault]
    tag8 = os.path.join(out, "checkpoints", "distill-lwd", "step-00000008")
    assert _latest(out) == "step-00000004" and left(tag8), os.listdir(os.path.dirname(tag8))
    assert is_complete(os.path.join(out, "checkpoints", "distill-lwd", "step-00000004")) is None
    if fault.startswith("save-shards"):
        control = str(root / "control")
        shutil.copytree(out, control)
    _relaunch_resumes_exactly(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), out, ref,
                              "step-00000004")
    record_fault(f"SIGKILL of rank {fault.split(':')[2]} during a checkpoint save, {when}",
                 f"the job exits with status {proc.returncode}; the re-run says `resumed from step-00000004`",
                 "`latest` = step-00000004, complete; the re-run ends bit-identical to an uninterrupted run")
    if not fault.startswith("save-shards"):
        return
    # control: the same relaunch without `latest` starts over and ALSO ends with the reference's weights;
    # only its record tells it apart, so the record is what the resume checks above rest on
    os.remove(os.path.join(control, "checkpoints", "distill-lwd", "latest"))
    r = run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config",
                                   _dropout_cfg(tiny, root, "control", teacher)))
    assert "resumed from" not in r.stdout + r.stderr
    assert last_launch(control) == (None, list(range(1, STEPS + 1)))
    a, b = student_weights(ref), student_weights(control)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["eval:2:all:TERM", "save-start:1:1:TERM"])
def test_sigterm_during_evaluation_or_a_save_finishes_it_saves_and_exits_75(tiny, dropout_run, fault):
    """Every rank gets SIGTERM during the evaluation at step 8, or rank 1 alone at the start of the
    save at step 4: the evaluation or save finishes, that step's checkpoint is complete and latest,
    the job exits 75 at once, and the re-run resumes bit-exactly."""
    root, ref, teacher = dropout_run
    name = "term-" + fault.split(":")[0]
    cfg = _dropout_cfg(tiny, root, name, teacher, **{"train.eval_interval": 4})  # evaluation changes no training bits
    out = str(root / name)
    proc = subprocess.run(_fault_cmd(cfg, fault), cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert "exits with return code = 75" in log and "Traceback" not in log, log[-3000:]
    tag = "step-00000008" if fault.startswith("eval") else "step-00000004"
    assert _latest(out) == tag and is_complete(os.path.join(out, "checkpoints", "distill-lwd", tag)) is None
    assert f"SIGTERM received; saved step {int(tag[5:])}" in log, log[-3000:]  # rank 0 names a peer's signal
    if fault.startswith("eval"):
        evals = [m["step"] for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "eval/loss" in m]
        assert evals == [4, 8]  # the interrupted evaluation finished and was logged
    _relaunch_resumes_exactly(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), out, ref, tag)
    record_fault("SIGTERM (SLURM's warning) " + ("to every rank during an evaluation" if fault.startswith("eval")
                                                  else "to one rank at the start of a checkpoint save"),
                 "`SIGTERM received; saved step N and exiting`, exit status 75 (EX_TEMPFAIL: run again)",
                 ("the evaluation and its save finish" if fault.startswith("eval") else "the save finishes")
                 + f"; `latest` = {tag}; the re-run ends bit-identical to an uninterrupted run")


def test_a_stopped_rank_ends_the_job_with_one_error_naming_the_collective(tiny, lwd_run):
    """SIGSTOP rank 1 after step 4's save: rank 0 waits in its next collective for
    train.timeout_minutes, then fails with one line naming it; the launcher stops the whole job
    (the stopped rank included) and no process of it is left."""
    root, _ = lwd_run
    timeout_s = 30
    cfg = _cfg(tiny, root, "sigstop", **{"train.timeout_minutes": timeout_s / 60})
    out = str(root / "sigstop")
    stopped = {}

    def stop(ranks):
        stopped.update(ranks, at=time.time())
        ranks[1].suspend()

    proc = _launch_and_interrupt(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), out,
                                 "step-00000004", stop)
    elapsed = time.time() - stopped.pop("at")
    log = proc.stdout.read()
    assert proc.returncode != 0 and "Traceback" not in log, log[-3000:]
    errors = [line for line in log.splitlines() if "ted-ds: " in line and "error: collective " in line]
    assert len(errors) == 1 and "a peer rank is stopped, dead or unreachable" in errors[0], log[-3000:]
    # the error within the timeout (+ start of the next step); the launcher then waits 30 s for the
    # stopped rank to take its SIGTERM before it SIGKILLs it
    assert timeout_s <= elapsed < timeout_s + 30 + 30, elapsed
    left = [p for p in stopped.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    assert _latest(out) == "step-00000004" and is_complete(os.path.join(out, "checkpoints", "distill-lwd",
                                                                        "step-00000004")) is None
    record_fault("a rank stopped (SIGSTOP) in the middle of training",
                 "one line on the waiting rank: `" + errors[0].split("error: ", 1)[1].split(" (train.")[0] + "`; "
                 "the job ends non-zero within train.timeout_minutes (+30 s for the launcher), no process left",
                 "`latest` = step-00000004, complete (a re-run resumes from it)")


def test_init_from_starts_a_new_run_from_another_runs_weights_with_fresh_state(tiny, lwd_run, tmp_path):
    """A new run (one process) from the reference run's checkpoint: step 1 is its first step, with a
    fresh schedule, optimizer and data position; at a negligible LR its weights stay the source's
    (a run that ignored init_from would end with teacher blocks 0 and 2, far from them)."""
    _, ref = lwd_run
    out = str(tmp_path / "next")
    cfg = _cfg(tiny, tmp_path, "next", **{"train.init_from": ref, "student.init_from_teacher": None,
                                          "train.steps": 2, "optim.lr": 1e-30, "optim.min_lr": 0.0,
                                          "optim.warmup_steps": 2, "optim.warmup_start_lr": 0.0})
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", cfg], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "train.init_from: wrote" in r.stdout and "identical to the checkpoint's" in r.stdout
    assert last_launch(out) == (None, [1, 2])
    lrs = [m["lr"] for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "lr" in m]
    assert lrs == pytest.approx([0.5e-30, 1e-30], rel=1e-6)  # the schedule starts again from its warmup
    state = json.load(open(os.path.join(out, "checkpoints", "distill-lwd", "step-00000002", "trainer_state.json")))
    assert state["sampler"]["consumed_samples"] == 2 * 8  # the data position starts again too
    a, b = student_weights(ref), student_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_latest_falls_back_with_a_warning(tiny, lwd_run, tmp_path):
    root, ref = lwd_run
    out = str(tmp_path / "corrupt")
    shutil.copytree(ref, out)
    ckpt = os.path.join(out, "checkpoints", "distill-lwd")
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step-")) == ["step-00000012", "step-00000016"]
    shard = os.path.join(ckpt, "step-00000016", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    cfg = _cfg(tiny, tmp_path, "corrupt")
    r = subprocess.run(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step-00000016 is unusable" in r.stderr and "resumed from step-00000012" in r.stderr
    assert last_launch(out) == ("step-00000012", list(range(13, STEPS + 1)))
    warning = next(line for line in r.stderr.splitlines() if "is unusable" in line)
    record_fault("the newest checkpoint damaged on disk (a truncated optimizer shard)",
                 "a warning: `" + warning[warning.index("checkpoint step-"):].strip() + "`",
                 "the run resumes from the previous complete checkpoint, step-00000012")
    # a checkpoint from another run shape is refused with one clear line
    bad = _cfg(tiny, tmp_path, "corrupt", **{"data.seq_len": 16})
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", bad], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"ted-ds: error: {ckpt} was trained to step 16 with another config (data.seq_len 32 -> 16)")


def test_a_run_owns_its_config_refusing_what_changes_training_and_saying_when_it_is_finished(tiny, lwd_run):
    """A copy of the finished 2-rank reference run re-launched: another α, LR and a longer run are refused
    in one line naming the keys, on every rank, before any process group (nothing trained, nothing
    written); the same config with another logging interval says the run had finished, trains nothing
    and records the safe changes in metrics.jsonl."""
    root, ref = lwd_run
    out = str(root / "owned")
    shutil.copytree(ref, out)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    cmd = deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", _cfg(tiny, root, "owned"))
    r = run_launcher([*cmd, "distill.alpha=4", "optim.lr=1e-2", f"train.steps={STEPS + 4}"], check=False)
    log = r.stdout + r.stderr
    errors = {line.split("error: ", 1)[1] for line in log.splitlines() if line.startswith("ted-ds: error: ")}
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in log, log[-3000:]
    error = errors.pop()
    assert error.startswith(f"{out}/checkpoints/distill-lwd was trained to step 16 with another config "
                            f"(distill.alpha 1.0 -> 4.0, optim.lr 0.003 -> 0.01, train.steps 16 -> 20)"), error
    assert f"train.init_from={out}/checkpoints/distill-lwd" in error
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    r = run_launcher([*cmd, "train.log_interval=2"])
    assert f"ted-ds: distill-lwd in {out} had already finished at step 16: nothing to train" in r.stderr
    assert last_launch(out) == ("step-00000016", [])
    mark = json.loads(open(os.path.join(out, "metrics.jsonl")).read().splitlines()[-1])
    assert mark["config_changed"] == {"train.out_dir": [ref, out], "train.log_interval": [1, 2]}
    assert not os.path.exists(os.path.join(out, "config.yaml"))
    assert yaml.safe_load(open(os.path.join(out, "config-distill-lwd.yaml")))["train"]["log_interval"] == 1


def test_killing_the_launcher_alone_stops_every_rank_after_a_save(tiny, lwd_run):
    """SIGTERM to the ``deepspeed`` launcher's PID only, not its process group (a user's ``kill PID``, a
    scheduler without process groups): the ranks under it see it gone, save a complete checkpoint and
    exit as on SIGTERM, long before the run's end; no process of the launch is left."""
    root, _ = lwd_run
    out = str(root / "orphaned")
    cfg = _cfg(tiny, root, "orphaned", **{"train.steps": 400})
    proc = subprocess.Popen(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while _latest(out) != "step-00000004":
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.01)
        below = psutil.Process(proc.pid).children(recursive=True)
        assert len(_rank_processes(proc)) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        _, left = psutil.wait_procs(below, timeout=120)
        assert not left, f"still running after the launcher died: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = proc.stdout.read()
    assert "SIGTERM received; saved step" in log and "Traceback" not in log, log[-3000:]
    saved = _latest(out)
    assert is_complete(os.path.join(out, "checkpoints", "distill-lwd", saved)) is None
    assert 4 <= int(saved[5:]) < 400 and not os.path.exists(os.path.join(out, "hf"))
    record_fault("SIGTERM to the `deepspeed` launcher's PID alone (not its process group)",
                 "the ranks see their launcher gone: `SIGTERM received; saved step N and exiting`, no process left",
                 f"`latest` = the step reached ({saved} here), complete; a re-run resumes from it")
