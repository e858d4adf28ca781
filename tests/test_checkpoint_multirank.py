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
from conftest import REPO, deepspeed_cmd, run_launcher
from safetensors.torch import load_file
from tiny import base_config, with_dropout, write_config

pytestmark = pytest.mark.multirank

STEPS = 16


def _cfg(tiny, root, name, teacher=None, **over):
    cfg = base_config(tiny["llama_data"], teacher or tiny["llama_teacher"], str(root / name),
                      **{"distill.method": "lwd", "train.steps": STEPS, "train.save_interval": 4,
                         "train.keep_last": 2, **over})
    return write_config(str(root / f"{name}.yaml"), **cfg)


def _losses(out_dir):
    return {m["step"]: m["loss/total"] for m in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))
            if "loss/total" in m}


def _last_launch(out_dir) -> tuple[str | None, list[int]]:
    """What the newest launch did, from its own lines in metrics.jsonl: the tag it resumed from (None:
    it started from step 0) and the steps it trained."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    marks = [i for i, row in enumerate(rows) if "resumed_from" in row]
    own = rows[marks[-1] + 1:] if marks else rows
    return (rows[marks[-1]]["resumed_from"] if marks else None), [r["step"] for r in own if "loss/total" in r]


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
    assert _last_launch(out) == (tag, list(range(int(tag.split("-")[1]) + 1, STEPS + 1)))
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(out) == _losses(ref)  # the whole curve: kept steps and re-run steps


def test_dropout_makes_the_resumed_runs_random(reference_run, dropout_run):
    dropped, plain = _losses(dropout_run[1]), _losses(reference_run[1])
    assert all(dropped[s] != plain[s] for s in plain)  # masks are drawn at every step, from the first


def test_sigkill_one_rank_mid_run_then_resume_is_bit_identical(tiny, dropout_run):
    root, ref, teacher = dropout_run
    cfg = _cfg(tiny, root, "killed", teacher)
    out = str(root / "killed")
    cmd = deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg)
    proc = _launch_and_interrupt(cmd, out, "step-00000004", lambda ranks: ranks[1].send_signal(signal.SIGKILL))
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "hf")), "the job must not have finished"
    stopped_at = max(_losses(out))
    assert stopped_at < STEPS
    _relaunch_resumes_exactly(cmd, out, ref, "step-00000004")


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
    assert f"resumed from {saved}" in r.stderr and _last_launch(out) == (saved, list(range(step + 1, STEPS + 1)))
    ref_losses, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # same samples in the same order, same optimizer state: equal up to float summation order
    # (1 rank accumulates 4 micro-batches where 2 ranks accumulated 2 each and averaged)
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(ref_losses[s], rel=1e-5), s
    a, b = _weights(ref), _weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_crash_during_save_leaves_latest_valid(tiny, dropout_run):
    root, ref, teacher = dropout_run
    cfg = _cfg(tiny, root, "crashsave", teacher)
    out = str(root / "crashsave")
    script = os.path.join(REPO, "tests", "mp", "crash_during_save.py")
    proc = subprocess.run(deepspeed_cmd(2, script, "--crash-at", "2", "distill", "--config", cfg), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    ckpt = os.path.join(out, "checkpoints", "distill-lwd")
    assert _latest(out) == "step-00000004"  # the 2nd save (step 8) died: latest still names step 4
    assert os.path.isdir(os.path.join(ckpt, "step-00000008"))  # half written ...
    assert not os.path.exists(os.path.join(ckpt, "step-00000008", "COMPLETE"))  # ... and never marked complete
    control = str(root / "control")
    shutil.copytree(out, control)
    _relaunch_resumes_exactly(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config", cfg), out, ref,
                              "step-00000004")
    # control: the same relaunch without `latest` starts over and ALSO ends with the reference's weights;
    # only its record tells it apart, so the record is what the resume checks above rest on
    os.remove(os.path.join(control, "checkpoints", "distill-lwd", "latest"))
    r = run_launcher(deepspeed_cmd(2, "--module", "ted_ds", "distill", "--config",
                                   _cfg(tiny, root, "control", teacher)))
    assert "resumed from" not in r.stdout + r.stderr
    assert _last_launch(control) == (None, list(range(1, STEPS + 1)))
    a, b = _weights(ref), _weights(control)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    from conftest import corpus_lines

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
