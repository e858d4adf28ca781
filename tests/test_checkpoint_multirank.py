"""Checkpoints under real failures: SIGKILL mid-step, SIGTERM, a crash mid-save, corruption,
resume on another rank count; export round trips; lm-evaluation-harness on the export.

The SIGKILL and crash-mid-save runs train a student with dropout: every step draws masks, so a
relaunch ends bit-identical to an uninterrupted run only if it restored the weights, the optimizer,
the data position AND every RNG. A relaunch that starts over also ends identical (training is
seeded), so each relaunch's own record in metrics.jsonl says which tag it resumed from and which
steps it ran; a control run that lost ``latest`` shows the difference."""

from __future__ import annotations

import functools
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
from safetensors.torch import load_file

from harness.common import REPO, deepspeed_cmd, last_launch, losses, record_fault, run_launcher
from harness.tiny import base_config, with_dropout, write_config
from ted_ds.checkpoint import is_complete

pytestmark = pytest.mark.multirank

STEPS = 16


def _cfg(tiny, root, name, teacher=None, **over):
    cfg = base_config(tiny["llama_data"], teacher or tiny["llama_teacher"], str(root / name),
                      **{"distill.method": "lwd", "train.steps": STEPS, "train.save_interval": 4,
                         "train.keep_last": 2, **over})
    return write_config(str(root / f"{name}.yaml"), **cfg)


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


def _weights(out_dir):
    return load_file(os.path.join(out_dir, "hf", "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = _cfg(tiny, root, "ref")
    run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg))
    return root, str(root / "ref")


@pytest.fixture(scope="module")
def dropout_run(tiny, tmp_path_factory):
    """An uninterrupted run whose student has dropout 0.1: (root, its out_dir, the teacher it came from)."""
    root = tmp_path_factory.mktemp("ckpt-dropout")
    teacher = with_dropout(tiny["llama_teacher"], str(root / "teacher"))
    run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", _cfg(tiny, root, "ref", teacher)))
    return root, str(root / "ref"), teacher


def _relaunch_resumes_exactly(cmd, out, ref, tag):
    """Relaunch ``cmd``: it must say it resumed from ``tag``, train only the steps after it, and end with
    the uninterrupted run's weights and loss curve, bit for bit."""
    r = run_launcher(cmd)
    assert f"ted-ds: resumed from {tag}" in r.stdout + r.stderr
    assert last_launch(out) == (tag, list(range(int(tag.split("-")[1]) + 1, STEPS + 1)))
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(ref)  # the whole curve: kept steps and re-run steps


def test_dropout_makes_the_resumed_runs_random(reference_run, dropout_run):
    dropped, plain = losses(dropout_run[1]), losses(reference_run[1])
    assert all(dropped[s] != plain[s] for s in plain)  # masks are drawn at every step, from the first


def test_sigkill_one_rank_mid_run_then_resume_is_bit_identical(tiny, dropout_run):
    root, ref, teacher = dropout_run
    cfg = _cfg(tiny, root, "killed", teacher)
    out = str(root / "killed")
    cmd = deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg)
    proc = _launch_and_interrupt(cmd, out, "step-00000004", lambda ranks: ranks[1].send_signal(signal.SIGKILL))
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "hf")), "the job must not have finished"
    stopped_at = max(losses(out))
    assert stopped_at < STEPS
    _relaunch_resumes_exactly(cmd, out, ref, "step-00000004")
    record_fault("SIGKILL of one rank between saves (a node lost)",
                 f"the job exits with status {proc.returncode}; the re-run says `resumed from step-00000004`",
                 "`latest` = step-00000004 (the steps after it are trained again); the re-run ends bit-identical to "
                 "an uninterrupted run")


def test_sigterm_saves_and_exits_then_resume_on_one_rank(tiny, reference_run):
    root, ref = reference_run
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
    a, b = _weights(ref), _weights(out)
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
    cfg = _cfg(tiny, root, name, teacher)
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
                                   _cfg(tiny, root, "control", teacher)))
    assert "resumed from" not in r.stdout + r.stderr
    assert last_launch(control) == (None, list(range(1, STEPS + 1)))
    a, b = _weights(ref), _weights(control)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["eval:2:all:TERM", "save-start:1:1:TERM"])
def test_sigterm_during_evaluation_or_a_save_finishes_it_saves_and_exits_75(tiny, dropout_run, fault):
    """Every rank gets SIGTERM during the evaluation at step 8, or rank 1 alone at the start of the
    save at step 4: the evaluation or save finishes, that step's checkpoint is complete and latest,
    the job exits 75 at once, and the re-run resumes bit-exactly."""
    root, ref, teacher = dropout_run
    name = "term-" + fault.split(":")[0]
    cfg = _cfg(tiny, root, name, teacher, **{"train.eval_interval": 4})  # evaluation changes no training bits
    out = str(root / name)
    proc = subprocess.run(_fault_cmd(cfg, fault), cwd=REPO, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert "exits with return code = 75" in log and "Traceback" not in log, log[-3000:]
    tag = "step-00000008" if fault.startswith("eval") else "step-00000004"
    assert _latest(out) == tag and is_complete(os.path.join(out, "checkpoints", "distill-lwd", tag)) is None
    assert f"SIGTERM received; saved step {int(tag[5:])}" in log or f"a peer signal received; saved step " \
        f"{int(tag[5:])}" in log, log[-3000:]
    if fault.startswith("eval"):
        evals = [m["step"] for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "eval/loss" in m]
        assert evals == [4, 8]  # the interrupted evaluation finished and was logged
    _relaunch_resumes_exactly(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), out, ref, tag)
    record_fault("SIGTERM (SLURM's warning) " + ("to every rank during an evaluation" if fault.startswith("eval")
                                                  else "to one rank at the start of a checkpoint save"),
                 "`... received; saved step N and exiting`, exit status 75 (EX_TEMPFAIL: run again)",
                 ("the evaluation and its save finish" if fault.startswith("eval") else "the save finishes")
                 + f"; `latest` = {tag}; the re-run ends bit-identical to an uninterrupted run")


def test_a_stopped_rank_ends_the_job_with_one_error_naming_the_collective(tiny, reference_run):
    """SIGSTOP rank 1 after step 4's save: rank 0 waits in its next collective for
    train.timeout_minutes, then fails with one line naming it; the launcher stops the whole job
    (the stopped rank included) and no process of it is left."""
    root, _ = reference_run
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


def test_init_from_starts_a_new_run_from_another_runs_weights_with_fresh_state(tiny, reference_run, tmp_path):
    """A new run (one process) from the reference run's checkpoint: step 1 is its first step, with a
    fresh schedule, optimizer and data position; at a negligible LR its weights stay the source's
    (a run that ignored init_from would end with teacher blocks 0 and 2, far from them)."""
    _, ref = reference_run
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
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_latest_falls_back_with_a_warning(tiny, reference_run, tmp_path):
    root, ref = reference_run
    out = str(tmp_path / "corrupt")
    shutil.copytree(ref, out)
    ckpt = os.path.join(out, "checkpoints", "distill-lwd")
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step-")) == ["step-00000012", "step-00000016"]
    shard = os.path.join(ckpt, "step-00000016", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    cfg = _cfg(tiny, tmp_path, "corrupt", **{"train.steps": STEPS + 2})
    r = subprocess.run(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step-00000016 is unusable" in r.stderr and "resumed from step-00000012" in r.stderr
    warning = next(line for line in r.stderr.splitlines() if "is unusable" in line)
    record_fault("the newest checkpoint damaged on disk (a truncated optimizer shard)",
                 "a warning: `" + warning[warning.index("checkpoint step-"):].strip() + "`",
                 "the run resumes from the previous complete checkpoint, step-00000012")
    # a checkpoint from another run shape is refused with one clear line
    bad = _cfg(tiny, tmp_path, "corrupt", **{"data.seq_len": 16})
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", bad], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ted-ds: error: checkpoint") and "seq_len" in r.stderr


def test_export_round_trip_is_exact(reference_run, tmp_path):
    _, ref = reference_run
    out = str(tmp_path / "exported")
    r = subprocess.run([sys.executable, "-m", "ted_ds", "export", ref, "--out", out, "--filters",
                        str(tmp_path / "bank")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logits on" in r.stderr and "identical" in r.stderr
    live, exported = _weights(ref), load_file(os.path.join(out, "model.safetensors"))
    assert live.keys() == exported.keys() and all(torch.equal(live[k], exported[k]) for k in live)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    r = subprocess.run([sys.executable, "-m", "ted_ds", "export", ref, "--out", str(tmp_path / "bf16"), "--dtype",
                        "bf16"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "rounded to torch.bfloat16" in r.stderr, r.stderr[-3000:]
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, live[k].to(torch.bfloat16)) for k, v in half.items())
    live_bank = load_file(os.path.join(ref, "student-filters", "filters.safetensors"))
    bank = load_file(str(tmp_path / "bank" / "filters.safetensors"))
    assert all(torch.equal(live_bank[k], bank[k]) for k in live_bank)


def _one_ulp_up(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` with its first element moved by one unit in the last place of ``dtype``."""
    bits = t.to(dtype).clone().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype])
    bits.view(-1)[0] += 1
    return bits.view(dtype).float()


def _one_weight_one_ulp_off(write, config, state, out_dir, tokenizer_dir, dtype):
    key = next(iter(state))
    write(config, {**state, key: _one_ulp_up(state[key], dtype)}, out_dir, tokenizer_dir, dtype)


def _norm_epsilon_off(write, config, state, out_dir, tokenizer_dir, dtype):
    """The right weights under a wrong config: only the logits can tell."""
    write(config, state, out_dir, tokenizer_dir, dtype)
    path = os.path.join(out_dir, "config.json")
    written = json.load(open(path))
    json.dump(dict(written, rms_norm_eps=1e-2), open(path, "w"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("corrupt, refusal", [(_one_weight_one_ulp_off, "weights are not the checkpoint's"),
                                              (_norm_epsilon_off, "reloaded logits differ")])
def test_an_export_that_is_not_the_checkpoint_fails_its_check(reference_run, tmp_path, monkeypatch, dtype, corrupt,
                                                              refusal):
    """A writer that gets the export slightly wrong: the check compares with the checkpoint itself, so
    the directory is refused (a check against the model just written would pass)."""
    from ted_ds import export as E
    from ted_ds.errors import CheckpointError

    monkeypatch.setattr(E, "write_hf_dir", functools.partial(corrupt, E.write_hf_dir))
    with pytest.raises(CheckpointError, match=refusal):
        E.export_checkpoint(reference_run[1], str(tmp_path / "bad"), dtype=dtype)


def test_lm_eval_harness_runs_offline_on_the_export(reference_run, tmp_path):
    from harness.common import corpus_lines
    from ted_ds.evaluate import write_rolling_task

    _, ref = reference_run
    jsonl = tmp_path / "heldout.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_lines(6, start=5000)))
    write_rolling_task(str(tmp_path / "tasks"), "ted_heldout", str(jsonl))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hfcache"))
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    r = subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={ref}/hf,dtype=float32",
                        "--include_path", str(tmp_path / "tasks"), "--tasks", "ted_heldout", "--device", "cpu",
                        "--batch_size", "2", "--output_path", str(tmp_path / "results")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "results") for f in fs if f.endswith(".json")]
    results = json.load(open(found[0]))["results"]["ted_heldout"]
    assert results["word_perplexity,none"] > 1.0 and 0 < results["bits_per_byte,none"] < 20


def test_per_window_losses_make_the_loss_and_pair_models_on_the_same_windows(reference_run, tiny):
    """What the demo's "within noise" column stands on: each window's mean NLL averages to the loss,
    and the paired interval is a hand computation (sd 0.1414 over 5 windows: ±1.96·0.0632)."""
    from ted_ds.evaluate import evaluate_hf, paired_difference

    r = evaluate_hf(f"{reference_run[1]}/hf", tiny["llama_data"], "valid", 32, 4, 12, "cpu", progress=False,
                    per_window=True)
    assert len(r["window_loss"]) == 12 and sum(r["window_loss"]) / 12 == pytest.approx(r["loss"], rel=1e-6)
    assert "window_loss" not in evaluate_hf(f"{reference_run[1]}/hf", tiny["llama_data"], "valid", 32, 4, 2, "cpu",
                                            progress=False)
    same = paired_difference(r["window_loss"], r["window_loss"])
    assert same["mean"] == 0 and same["within_noise"]
    d = paired_difference([0.0, -0.2, 0.2, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((-1.0, -1.124, -0.876), abs=1e-3)
    assert not d["within_noise"]
    assert paired_difference([0.1, -0.1, 0.2, -0.2], [0.0] * 4)["within_noise"]


def test_export_of_a_tied_gpt2_student_and_bad_checkpoint_paths(tiny, tmp_path, capsys):
    from ted_ds.cli import main as ted_main

    cfg = base_config(tiny["gpt2_data"], tiny["gpt2_teacher"], str(tmp_path / "g"),
                      **{"distill.method": "kd", "train.steps": 2})
    path = write_config(str(tmp_path / "g.yaml"), **cfg)
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", path], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = str(tmp_path / "g-export")
    r = subprocess.run([sys.executable, "-m", "ted_ds", "export", str(tmp_path / "g"), "--out", out], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "identical" in r.stderr, r.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    live = load_file(os.path.join(str(tmp_path / "g"), "hf", "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(live[k], exported[k]) for k in live)
    # bad inputs: one line each
    g = str(tmp_path / "g")
    for argv, frag in (([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "expected one checkpoint"),
                       ([g, "--out", str(tmp_path / "x"), "--tag", "step-00000099"], "no checkpoint tag"),
                       ([g], "nothing to do")):
        capsys.readouterr()
        assert ted_main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("ted-ds: error:") and frag in err[-1], err
