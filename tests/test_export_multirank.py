"""Exports of a real 2-rank run's checkpoint: exact round trips (fp32, bf16, the filter bank), an export
that is not the checkpoint refused, lm-evaluation-harness offline on it, per-window losses, a tied GPT-2
student, and bad checkpoint paths."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness.common import REPO, student_weights
from harness.tiny import base_config, write_config
from ted_ds.export import trained_seq_len

pytestmark = pytest.mark.multirank


def test_export_round_trip_is_exact(lwd_run, tmp_path):
    _, ref = lwd_run
    out = str(tmp_path / "exported")
    r = subprocess.run([sys.executable, "-m", "ted_ds", "export", ref, "--out", out, "--filters",
                        str(tmp_path / "bank")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logits on" in r.stderr and "identical" in r.stderr
    live, exported = student_weights(ref), load_file(os.path.join(out, "model.safetensors"))
    assert live.keys() == exported.keys() and all(torch.equal(live[k], exported[k]) for k in live)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert trained_seq_len(out) == trained_seq_len(f"{ref}/hf") == 32  # the harness's window: eval's default
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


def _one_weight_one_ulp_off(write, config, state, out_dir, tokenizer_dir, dtype, **kw):
    key = next(iter(state))
    write(config, {**state, key: _one_ulp_up(state[key], dtype)}, out_dir, tokenizer_dir, dtype, **kw)


def _norm_epsilon_off(write, config, state, out_dir, tokenizer_dir, dtype, **kw):
    """The right weights under a wrong config: only the logits can tell."""
    write(config, state, out_dir, tokenizer_dir, dtype, **kw)
    path = os.path.join(out_dir, "config.json")
    written = json.load(open(path))
    json.dump(dict(written, rms_norm_eps=1e-2), open(path, "w"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("corrupt, refusal", [(_one_weight_one_ulp_off, "weights are not the checkpoint's"),
                                              (_norm_epsilon_off, "reloaded logits differ")])
def test_an_export_that_is_not_the_checkpoint_fails_its_check(lwd_run, tmp_path, monkeypatch, dtype, corrupt,
                                                              refusal):
    """A writer that gets the export slightly wrong: the check compares with the checkpoint itself, so
    the directory is refused (a check against the model just written would pass)."""
    from ted_ds import export as E
    from ted_ds.errors import CheckpointError

    monkeypatch.setattr(E, "write_hf_dir", functools.partial(corrupt, E.write_hf_dir))
    with pytest.raises(CheckpointError, match=refusal):
        E.export_checkpoint(lwd_run[1], str(tmp_path / "bad"), dtype=dtype)


def test_lm_eval_harness_runs_offline_on_the_export(lwd_run, tmp_path):
    from harness.common import corpus_lines
    from ted_ds.evaluate import write_rolling_task

    _, ref = lwd_run
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
    assert "is defined, but" not in r.stderr, r.stderr[-3000:]  # the task names each metric's aggregation
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "results") for f in fs if f.endswith(".json")]
    results = json.load(open(found[0]))["results"]["ted_heldout"]
    assert results["word_perplexity,none"] > 1.0 and 0 < results["bits_per_byte,none"] < 20


def test_per_window_losses_make_the_loss_and_pair_models_on_the_same_windows(lwd_run, tiny):
    """What the demo's "within noise" column stands on: each window's mean NLL averages to the loss,
    and the paired interval is a hand computation (sd 0.1414 over 5 windows: ±1.96·0.0632)."""
    from ted_ds.evaluate import evaluate_hf, paired_difference

    r = evaluate_hf(f"{lwd_run[1]}/hf", tiny["llama_data"], "valid", 32, 4, 12, "cpu", progress=False,
                    per_window=True)
    assert len(r["window_loss"]) == 12 and sum(r["window_loss"]) / 12 == pytest.approx(r["loss"], rel=1e-6)
    assert "window_loss" not in evaluate_hf(f"{lwd_run[1]}/hf", tiny["llama_data"], "valid", 32, 4, 2, "cpu",
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
