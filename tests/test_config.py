"""Config loading and validation: bad schedules, fixed choices, bad configs and model directories whose
code would have to run (``--trust-remote-code``), each refused in one line before any process group."""

from __future__ import annotations

import json
import re

import pytest

from harness.tiny import base_config, write_config
from ted_ds.cli import main as ted_main
from ted_ds.config import DistillConfig, load_run_config
from ted_ds.errors import ConfigError


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_start_lr=2.0", "optim.warmup_start_lr must be in [0, optim.lr"),
    ("optim.decay_fraction=0", "optim.decay_fraction must be in (0, 1]"),
    ("optim.schedule=linear", "optim.schedule must be one of cosine, wsd, constant"),
    ("optim.decay_fraction=0.9", "optim.schedule wsd: 1 warmup + 4 decay steps (optim.decay_fraction 0.9) exceed"),
    (("distill.beta_schedule=wsd", "distill.weight_warmup_steps=2", "distill.weight_decay_fraction=0.9"),
     "distill.beta_schedule wsd: 2 warmup + 4 decay steps (distill.weight_decay_fraction 0.9) exceed the run's 4"),
    ("distill.alpha_schedule=cosine", "distill.alpha_schedule must be one of constant, wsd, linear"),
    (("distill.alpha_schedule=linear", "distill.alpha=0"), "distill.alpha_schedule linear runs from distill.alpha > 0"),
    (("distill.beta_schedule=linear", "distill.method=kd"), "distill.beta_schedule: method kd has no beta term"),
    ("distill.weight_decay_fraction=0", "distill.weight_decay_fraction in (0, 1]; got 0 and 0"),
])
def test_bad_schedules_are_one_line_before_any_process_group(tiny, tmp_path, override, message, capsys):
    from ted_ds.cli import main

    cfg = write_config(str(tmp_path / "c.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"],
                                                                str(tmp_path / "o")))
    overrides = [override] if isinstance(override, str) else list(override)
    assert main(["distill", "--config", cfg, "distill.method=lwd", "optim.schedule=wsd", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ted-ds: error: ") and message in err[0], err


@pytest.mark.parametrize("key, allowed", [
    ("distill.method", "ted, lwd, kd, lm"), ("teacher.placement", "replicated, zero3, pipeline"),
    ("distill.layer_loss", "mse, normalized_mse, cosine"), ("distill.filter", "linear, mlp"),
    ("optim.schedule", "cosine, wsd, constant"), ("teacher.logits_dtype", "fp32, bf16, fp16"),
    ("distill.filter_head", "teacher, trainable"), ("distill.divergence", "forward_kl, reverse_kl, jsd, skew_kl"),
    ("teacher.logits_topk_form", "tail, renormalized"),
])
def test_fixed_choices_are_one_line_naming_every_choice(key, allowed):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [f"{key}=other"])
    assert str(e.value) == f"{key} must be one of {allowed}; got 'other'"


@pytest.mark.parametrize("divergence, mix, message", [
    ("jsd", 0.0, "must be in (0, 1) for jsd"), ("jsd", 1.0, "must be in (0, 1) for jsd"),
    ("skew_kl", 1.0, "must be in [0, 1) for skew_kl"), ("skew_kl", -0.1, "must be in [0, 1) for skew_kl"),
])
def test_a_divergence_mix_out_of_range_is_refused(divergence, mix, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, [f"distill.divergence={divergence}", f"distill.divergence_mix={mix}"])
    DistillConfig(divergence="skew_kl", divergence_mix=0.0)  # the edge that is allowed: forward KL


def _fails(capsys, tmp_path, cfg: dict, *fragments, overrides=(), command="distill"):
    path = write_config(str(tmp_path / "bad.yaml"), **cfg)
    capsys.readouterr()
    assert ted_main([command, "--config", path, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-ds: error: ") and "\n" not in err, err
    for frag in fragments:
        assert frag in err, (frag, err)


def test_bad_configs_fail_before_any_process_group(tiny, gpt2_tokenizer, tmp_path, capsys):
    import torch.distributed as dist

    good = lambda **o: base_config(tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "o"), **o)
    cfg = good()
    cfg["train"]["colour"] = "red"
    _fails(capsys, tmp_path, cfg, "unknown config key train.colour")
    _fails(capsys, tmp_path, good(), "train.steps must be int", overrides=["train.steps=many"])
    _fails(capsys, tmp_path, good(), "teacher.filters", "learn-filters")  # ted without stage 1
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "data.seq_len": 4096}), "seq_len 4096 exceeds")
    _fails(capsys, tmp_path, good(**{"distill.method": "lwd", "distill.teacher_every": 4}), "tap mismatch")
    _fails(capsys, tmp_path, good(**{"data.path": str(tmp_path / "nodata")}), "not a ted-prep dataset")
    _fails(capsys, tmp_path, good(**{"teacher.path": str(tmp_path / "noteacher")}), "teacher.path not found",
           "noteacher")
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "train.deepspeed_config": "nope.json"}),
           "DeepSpeed config not found")
    stage2 = tmp_path / "zero2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "train.deepspeed_config": str(stage2)}),
           "zero_optimization.stage is 2", "stage3_param_persistence_threshold")
    # a teacher whose tokenizer is not the data's
    _fails(capsys, tmp_path, base_config(tiny["llama_data"], tiny["gpt2_teacher"], str(tmp_path / "o"),
                                         **{"distill.method": "kd"}), "different tokenizer")
    _fails(capsys, tmp_path, good(**{"distill.method": "kd", "train.global_batch_size": 7}), "not a multiple")
    assert not dist.is_initialized()


def test_code_in_a_model_directory_never_runs_without_trust_remote_code(tiny, tmp_path, capsys):
    import json
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny["llama_teacher"], model)
    marker = tmp_path / "EXECUTED"
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.load(open(model / "config.json"))
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["model_type"] = "evil"  # only the directory's own code could load it
    json.dump(config, open(model / "config.json", "w"))
    capsys.readouterr()
    assert ted_main(["eval", str(model), "--data", tiny["llama_data"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-ds: error:") and "\n" not in err
    _fails(capsys, tmp_path, base_config(tiny["llama_data"], str(model), str(tmp_path / "o"),
                                         **{"distill.method": "kd"}), "not a loadable HF model config")
    assert not marker.exists()


@pytest.mark.parametrize("section,fields,message", [
    ("TeacherConfig", {"pipeline_stages": 0}, "teacher.pipeline_stages must be ≥ 1, got 0"),
    ("TeacherConfig", {"cache": "c"}, "teacher.cache holds the teacher's top-k logits"),
    ("TeacherConfig", {"logits_topk_form": "renormalized"}, "teacher.logits_topk_form renormalized is a form of"),
    ("DataConfig", {"path": "d", "seq_len": 0}, "data.seq_len must be ≥ 1, got 0"),
    ("DataConfig", {"path": "d", "sources": []}, "give data.path (one source) or data.sources, not both"),
    ("DistillConfig", {"temperature": 0.0}, "distill.temperature > 0"),
    ("DistillConfig", {"pairs": [[2, 1]], "teacher_every": 2}, "give distill.pairs or"),
    ("OptimConfig", {"lr": 1e-4, "min_lr": 1e-3}, "0 ≤ optim.min_lr ≤ optim.lr"),
    ("OptimConfig", {"decay_fraction": 0.0}, "optim.decay_fraction must be in (0, 1], got 0"),
    ("TrainConfig", {"keep_last": 0}, "train.keep_last must be ≥ 1, got 0"),
    ("TrainConfig", {"steps": 10, "tokens": 100}, "set only one of train.steps and train.tokens"),
])
def test_each_section_checks_its_own_fields_when_built(section, fields, message):
    """A section built on its own (a test, a library caller, dataclasses.replace) is checked as a loaded config is."""
    from ted_ds import config

    with pytest.raises(ConfigError) as e:
        getattr(config, section)(**fields)
    assert message in str(e.value)


def test_total_steps_from_tokens_round_up_to_whole_steps(tiny, tmp_path):
    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(
        tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "o"), **{"train.steps": None,
                                                                          "train.tokens": 8 * 32 * 5 + 1})))
    assert cfg.tokens_per_step == 8 * 32 and cfg.total_steps == 6


RUN = ["train.steps=1", "data.path=d", "student.config=s", "teacher.path=t", "distill.method=kd"]


@pytest.mark.parametrize("overrides, message", [
    (["teacher.logits_topk=-1"], "teacher.logits_topk must be ≥ 0 (0: every logit), got -1"),
    (["distill.method=lm", "teacher.path=null", "teacher.cache=c", "teacher.logits_topk=4"],
     "method lm uses no teacher: remove teacher.cache"),
    (["teacher.path=null"], "method kd needs teacher.path"),
    (["train.eval_steps=[0, 5]"], "train.eval_steps must be steps ≥ 1, got [0, 5]"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
    (["teacher.placement=pipeline", "teacher.pipeline_chunks=5", "train.micro_batch_size=4"],
     "teacher.pipeline_chunks 5 exceeds train.micro_batch_size 4: a chunk would hold no sequence"),
    (["teacher.logits_top_p=0.9"], "teacher.logits_top_p keeps at most teacher.logits_topk entries per token: set "
                                   "teacher.logits_topk as its cap (e.g. 100)"),
    (["teacher.logits_topk=100", "teacher.logits_top_p=1.5"], "teacher.logits_top_p must be in (0, 1], got 1.5"),
    (["teacher.logits_sampling=sampled", "teacher.logits_samples=0"], "teacher.logits_samples must be ≥ 1, got 0"),
    (["teacher.logits_sampling=sampled", "teacher.logits_topk=64"], "teacher.logits_sampling: sampled draws from "
     "every logit: drop teacher.logits_topk and teacher.logits_top_p"),
    (["teacher.logits_sampling=sampled", "distill.divergence=reverse_kl"], "teacher.logits_sampling: sampled "
     "estimates forward KL only (unbiased by its draws); distill.divergence reverse_kl needs the teacher's logits: "
     "use forward_kl or top-k"),
    (["teacher.logits_sampling=sampled", "teacher.logits_topk_form=renormalized"], "teacher.logits_topk_form "
     "renormalized is a form of top-k KD: set teacher.logits_topk, or drop the form"),
])
def test_run_configs_that_cannot_work_are_refused_in_one_line(overrides, message):
    """Each check of a loaded run config: the message in full (one line), and the config without the
    bad override loads."""
    with pytest.raises(ConfigError) as e:
        load_run_config(None, RUN + overrides)
    assert str(e.value) == message
    load_run_config(None, RUN + ["teacher.placement=pipeline", "teacher.pipeline_chunks=4"])


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 10\n  out_dir: [runs/a\ndistill:\n  alpha: 2\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(str(path))
    assert str(e.value) == (f"{path}:4:8: not valid YAML (expected ',' or ']', but got ':', while parsing a flow "
                            "sequence started on line 3)")
