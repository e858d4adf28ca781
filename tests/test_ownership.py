"""A run owns its config and its records, in-process: which keys a resumed launch may change (the rest
refused in one line naming them), and metrics.jsonl shared by several jobs of one out_dir. The real
2-rank refusal and the finished re-run: test_checkpoint_multirank.py."""

from __future__ import annotations

import json

import pytest

from harness.tiny import base_config, write_config
from ted_ds.checkpoint import CheckpointRecord, owned_config_changes
from ted_ds.config import SAFE_TO_CHANGE, config_changes, flat_config, load_run_config, to_dict
from ted_ds.errors import CheckpointError
from ted_ds.metrics import MetricsLogger

TRAINED = ["distill.method=kd", "distill.alpha=4", "distill.beta=0.5", "distill.divergence=jsd",
           "distill.temperature=1.0", "data.path=/other/data", "data.seq_len=64", "optim.lr=1e-2",
           "optim.schedule=wsd", "optim.warmup_steps=3", "optim.min_lr=0", "train.steps=80", "train.seed=7",
           "train.global_batch_size=16", "teacher.path=/other/teacher", "student.init_from_teacher=[0, 1]",
           "teacher.logits_topk=8", "train.deepspeed_config=/other.json"]
SAFE = ["train.log_interval=5", "train.eval_interval=7", "train.eval_steps=[2]", "train.save_interval=3",
        "train.keep_last=4", "train.timeout_minutes=30", "train.progress=true", "data.eval_samples=4",
        "train.out_dir=/moved/run"]


def _config(tmp_path, *overrides):
    path = write_config(str(tmp_path / "run.yaml"), **base_config("/data", "/teacher", "/runs/a"))
    return load_run_config(path, list(overrides))


@pytest.mark.parametrize("override", TRAINED)
def test_a_change_to_what_is_trained_is_refused(tmp_path, override):
    refused, allowed = config_changes(_config(tmp_path), _config(tmp_path, override))
    assert list(refused) == [override.split("=")[0]] and not allowed


@pytest.mark.parametrize("override", SAFE)
def test_a_change_to_how_the_run_logs_evaluates_and_saves_is_allowed(tmp_path, override):
    refused, allowed = config_changes(_config(tmp_path), _config(tmp_path, override))
    assert list(allowed) == [override.split("=")[0]] and not refused


def test_the_safe_keys_are_real_keys(tmp_path):
    assert SAFE_TO_CHANGE <= set(flat_config(_config(tmp_path)))


def _state(cfg) -> CheckpointRecord:
    return CheckpointRecord(step=60, tokens=0, sampler={}, identity={}, run={"config": to_dict(cfg)}, world_size=2,
                            tag="step-00000060")


def test_a_resume_refusal_is_one_line_naming_every_key_and_the_way_on(tmp_path):
    new = _config(tmp_path, "distill.alpha=4", "distill.divergence=jsd", "optim.lr=1e-2", "train.log_interval=5")
    with pytest.raises(CheckpointError) as e:
        owned_config_changes(_state(_config(tmp_path)), new, "/runs/a/checkpoints/distill-ted")
    line = str(e.value)
    assert "\n" not in line and "train.log_interval" not in line
    for part in ("distill.alpha 1.0 -> 4.0", "distill.divergence 'forward_kl' -> 'jsd'", "optim.lr 0.003 -> 0.01",
                 "train.init_from=/runs/a/checkpoints/distill-ted", "another train.out_dir"):
        assert part in line, line


def test_safe_changes_come_back_to_be_recorded(tmp_path):
    changed = owned_config_changes(_state(_config(tmp_path)), _config(tmp_path, "train.log_interval=5"), "/c")
    assert changed == {"train.log_interval": (1, 5)}


def test_a_job_keeps_every_other_jobs_metrics_in_a_shared_out_dir(tmp_path):
    """Stage 1 of the teacher, then of the student, then stage 2, in one out_dir: each job's lines stay; a
    resumed job drops only its own lines past the step it resumed from."""
    out = str(tmp_path)

    def job(name, start, steps, changed=None):
        log = MetricsLogger(out, True, 10, start, False, name)
        if start:
            log.resumed("step-x", start, 0, changed or {})
        for s in steps:
            log.log(s, {"loss/total": float(s)})
        log.close()

    job("filters-teacher", 0, [1, 2, 3])
    job("filters-student", 0, [1, 2])
    job("filters-student", 1, [2, 3], {"train.log_interval": (1, 5)})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = lambda name: [r["step"] for r in rows if r["job"] == name and "loss/total" in r]
    assert steps("filters-teacher") == [1, 2, 3] and steps("filters-student") == [1, 2, 3]
    marks = [r for r in rows if "resumed_from" in r]
    assert marks == [{"step": 1, "job": "filters-student", "resumed_from": "step-x",
                      "config_changed": {"train.log_interval": [1, 5]}}]
    assert (tmp_path / "tb" / "filters-teacher").is_dir() and (tmp_path / "tb" / "filters-student").is_dir()
