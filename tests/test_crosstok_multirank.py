"""Distilling across tokenizers on a real 2-rank DeepSpeed run with the teacher ZeRO-3-sharded or split into a
2-stage pipeline, KD and TED, checked against a single-process reference: each rank's teacher reads its own
micro-batch's tokens, of a width of its own, while the ranks gather the teacher's parameters together (ZeRO-3)
or pass every rank's micro-batch through both stages (the pipeline pads them to the widest and cuts each
rank's output back).  The student (SentencePiece) learns from the tiny GPT-2 teacher (byte-level BPE); one
launch runs all four."""

from __future__ import annotations

import json
import os

import pytest
import torch

from harness.scenarios import launch_scenarios
from harness.tiny import base_config, write_config
from ted_ds.plan import Job

pytestmark = pytest.mark.multirank

STEPS = 2
SCENARIOS = {f"{method}_{placement}": (method, placement) for placement in ("zero3", "pipeline")
             for method in ("kd", "ted")}  # name: (distill.method, teacher.placement)


def stage1_banks(tiny, root) -> dict:
    """Random stage-1 banks as each side learns them on its own tokens (configs without cross_tokenizer): the
    GPT-2 teacher's on its data, the random LLaMA-shaped student's on the SentencePiece data."""
    from ted_ds.config import load_run_config
    from ted_ds.filters import FilterBank, save_filter_bank
    from ted_ds.plan import expected_bank, plan

    own_tokens = {"teacher": (tiny["gpt2_data"], tiny["gpt2_teacher"]), "student": (tiny["llama_data"],
                                                                                     tiny["llama_teacher"])}
    out = {}
    for side, (data, model) in own_tokens.items():  # the student's: random, of the tiny LLaMA's shape
        cfg = write_config(str(root / f"stage1-{side}.yaml"), **base_config(data, model, str(root), **{
            "distill.teacher_every": 2, "distill.student_every": 2, "student.init_from_teacher": None,
            "student.config": model}))
        m = expected_bank(plan(load_run_config(cfg), Job.learning_filters_of(side)), side)
        bank = FilterBank(m["kind"], m["in_dim"], m["out_dim"], m["layers"], seed=1, model=m["model"])
        out[f"{side}.filters"] = str(root / f"bank-{side}")
        save_filter_bank(bank.state_dict(), bank.meta(), out[f"{side}.filters"])
    return out


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    banks = stage1_banks(tiny, root)
    configs = {}
    for name, (method, placement) in SCENARIOS.items():
        cfg = base_config(tiny["llama_data"], tiny["gpt2_teacher"], str(root / name), **{
            "student.init_from_teacher": None, "student.config": tiny["llama_teacher"], "distill.method": method,
            "distill.teacher_every": 2, "distill.student_every": 2, "distill.cross_tokenizer": "chunk_likelihood",
            "teacher.placement": placement, "train.steps": STEPS, **(banks if method == "ted" else {})})
        configs[name] = write_config(str(root / f"{name}.yaml"), **cfg)
    spec = [{"name": name, "config": path} for name, path in configs.items()]
    return launch_scenarios(2, spec, {n: str(root / n) for n in configs}, configs, str(root / "spec.json"),
                            timeout=600)


def cross_reference(config_path: str, steps: int) -> list[float]:
    """Each step's loss in one process with plain PyTorch (no DeepSpeed, no ranks): per micro-batch the teacher
    reads its own tokens of the text (``CrossTokenizer.batch``), the student its own."""
    from ted_ds.config import load_run_config
    from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset, collate
    from ted_ds.losses import ObjectiveWeights, cross_tokenizer_objective
    from ted_ds.models import distill_modules
    from ted_ds.optim import lr_multiplier, param_groups
    from ted_ds.plan import plan
    from ted_ds.run import seed_everything
    from ted_ds.teacher import FrozenLM
    from ted_ds.weights import load_model

    cfg = load_run_config(config_path)
    p, d, o = plan(cfg), cfg.distill, cfg.optim
    seed_everything(cfg.train.seed)
    student, teacher_filters = distill_modules(p)
    teacher = FrozenLM(load_model(cfg.teacher.path), p.teacher_layers if cfg.uses_layers else [], teacher_filters,
                       True, vocab=len(p.cross.teacher))
    opt = torch.optim.AdamW(param_groups(student, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, o, p.total_steps))
    data = PackedShardDataset(cfg.data.path, "train", cfg.data.seq_len)
    sampler = ConsumedSamplesSampler(len(data), cfg.train.global_batch_size, cfg.train.micro_batch_size, 0, 1,
                                     cfg.train.seed)
    w = ObjectiveWeights(d.alpha, d.beta, d.temperature, d.layer_loss, p.manifest["vocab_size"])
    per_step = []
    for _ in range(steps):
        micro = sampler.next_batch()
        per_step.append(0.0)
        for x, y in (collate(data, idx) for idx in micro):
            view = p.cross.batch(x, y)
            with torch.no_grad():
                t = teacher(view.input_ids)
            t_taps, t_logits = t.taps, t.logits
            logits, taps = student(x)
            loss = cross_tokenizer_objective(logits, y, t_logits, view, w, p.cross.shared, taps, t_taps)["loss"]
            (loss / len(micro)).backward()
            per_step[-1] += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return per_step


def logged(out_dir: str, key: str) -> list[float]:
    return [row[key] for row in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if key in row]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_2_rank_run_across_tokenizers_matches_the_single_process_reference(runs, name):
    got = logged(runs.dir(name), "loss/total")
    assert len(got) == STEPS and got == pytest.approx(cross_reference(runs.configs[name], STEPS), rel=1e-5, abs=1e-6)
    terms = {"chunk_likelihood", "layer"} if SCENARIOS[name][0] == "ted" else {"chunk_likelihood"}
    assert all(len(logged(runs.dir(name), f"loss/{term}")) == STEPS for term in terms)


def test_each_rank_stores_about_half_of_the_zero3_teacher(runs):
    record = runs.record("ted_zero3")
    assert record["frozen_local_params_rank0"] < 0.6 * record["frozen_local_params_sum"]
