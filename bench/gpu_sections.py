"""The GPU check's sections beyond the distillation run (bench/gpu_check.py calls them on its ``Check``):

* attention: SDPA causal, SDPA with the dense document mask and FlexAttention with the document
  BlockMask at the teacher's and the student's attention shapes (in process, bench/gpu_measure.py);
* teacher: the frozen teacher's forward at micro-batch 1 and 2, document attention off and on (in process);
* student: the ted-ds student step (the engine worker, ``distill.method=lm``: the student alone
  under DeepSpeed ZeRO-3) at each micro-batch against a plain PyTorch step of the same model, then
  each lever alone at the check's micro-batch, and a profile of the configured step;
* ted: the TED step with the fastest student settings, without and with document attention.

The engine worker takes the levers as the CLI's own ``key=value`` overrides.  Every figure goes into
the check's result and is saved at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from bench.common import REPO, persistent_config
from bench.gpu_measure import attention, mfu, plain_steps, teacher_forwards

DS_CONFIG = os.path.join(REPO, "ds_configs", "zero3_bf16.json")
WORKER = os.path.join(REPO, "bench", "mp_engine_bench.py")
SKIPPED_ON_CPU = {"flex_attention": "FlexAttention has no backward on a CPU: the project refuses to train with it "
                                    "there (ted_ds.documents.check_trainable_attention)"}


def attention_section(c) -> None:
    """Section A: the attention kernels at the teacher's and the student's (heads, kv heads, head dim)."""
    s = c.shape
    for side in ("teacher", "student"):
        heads, kv_heads = s[side]["num_attention_heads"], s[side]["num_key_value_heads"]
        head_dim = s[side]["hidden_size"] // heads
        c.result.setdefault("attention", {})[side] = c.call(f"attention {side}", functools.partial(
            attention, heads, kv_heads, head_dim, s["micro_batch"], s["attention_seq"], s["documents"], c.device,
            c.dtype, s["attention_calls"]))
        c.save()


def teacher_section(c) -> None:
    """Section B: the frozen teacher's forward, as a run builds it, at micro-batch 1 and 2."""
    s = c.shape
    c.result["teacher_forward"] = c.call("teacher forward", lambda: teacher_forwards(
        c.paths["teacher"], s["taps"][0], c.data, s["seq_len"], (1, 2), c.manifest["eos_token_id"],
        c.manifest["vocab_size"], c.device, c.dtype, s["forward_steps"], c.peak_flops(c.dtype)))
    c.save()


def worker(c, what: str, options: list[str], overrides: list[str]) -> dict | None:
    """The engine worker (bench/mp_engine_bench.py) on the check's run config at world size 1, as the
    phase ``what``: its figures, or None when it failed."""
    out = os.path.join(c.work, "engine-" + what.replace(" ", "-") + ".json")
    if c.run([sys.executable, WORKER, "--config", c.config, "--out", out, *options, *overrides], what) is None:
        return None
    with open(out) as f:
        return json.load(f)[0]


def step_figures(c, e: dict) -> dict:
    """Step seconds, tokens/s, MFU (the trainer's FLOPs per token, the device's bf16 peak) and peak memory."""
    import torch

    tokens_per_s = e["tokens_per_step"] / e["step_s"]
    return {"step_s": e["step_s"], "tokens_per_s": tokens_per_s, "peak_gpu_gib": e["peak_gpu_gib"],
            "mfu": mfu(e["flops_per_token"] * tokens_per_s, c.peak_flops(torch.bfloat16))}


def engine_step(c, method: str, name: str, micro_batch: int, overrides: list[str], profile: int = 0) -> dict:
    """One step of ``distill.method`` at ``micro_batch`` (one micro-batch a step) with ``overrides``: a
    row of the result, with its figures (and ``profile``: a breakdown of that many profiled steps)."""
    row = {"variant": name, "micro_batch": micro_batch, "overrides": overrides}
    options = ["--warmup", "2", "--steps", str(c.shape["step_steps"]), "--profile-steps", str(profile)]
    batch = [f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}"]
    e = worker(c, f"{method} step {name} mb{micro_batch}", options, [f"distill.method={method}", *batch, *overrides])
    if e is None:
        return {**row, "failed": True}
    return {**row, **step_figures(c, e), **({"profile": e["profile"]} if profile else {})}


def levers(c) -> dict[str, list[str]]:
    """Each lever of the ted-ds step as the CLI's overrides; the attention ones and compilation apply to
    student and teacher alike (a student-only step loads no teacher)."""
    both = lambda impl: [f"student.attn_implementation={impl}", f"teacher.attn_implementation={impl}"]
    return {"persistent_params": [f"train.deepspeed_config={persistent_config(DS_CONFIG, c.work)}"],
            "activation_checkpointing": ["student.activation_checkpointing=true"],
            "eager": both("eager"), "flex_attention": both("flex_attention"),
            "compile_blocks": ["train.compile_blocks=true"]}


def student_section(c) -> None:
    """The headline student figures: the ted-ds student step (with a profile) and the plain PyTorch step of
    the same model at the check's micro-batch (``student_mfu``, ``student_vs_plain``)."""
    rows = student_steps(c, "student_steps", (c.shape["micro_batch"],))
    summary = student_summary(rows, c.shape["micro_batch"])
    c.result.update({k: summary[k] for k in ("student_mfu", "student_vs_plain")})
    c.save()


def levers_section(c) -> None:
    """The ted-ds and the plain step at the other micro-batches, then each lever alone at the check's, as
    rows of ``lever_steps`` (its own key: a section measured again never mixes with another's rows)."""
    s = c.shape
    rows = student_steps(c, "lever_steps", tuple(mb for mb in s["micro_batches"] if mb != s["micro_batch"]))
    for name, overrides in levers(c).items():
        if c.dry_run and name in SKIPPED_ON_CPU:
            rows.append({"variant": name, "micro_batch": s["micro_batch"], "skipped": SKIPPED_ON_CPU[name]})
        else:
            rows.append(engine_step(c, "lm", name, s["micro_batch"], overrides))
        c.save()
    summary = student_summary([*c.result.get("student_steps", []), *rows], s["micro_batch"])
    c.result.update({k: summary[k] for k in ("student_vs_plain_by_micro_batch", "best_student")})
    c.save()


def student_steps(c, key: str, micro_batches: tuple[int, ...]) -> list[dict]:
    """The plain step (bench/gpu_measure.plain_steps) and the ted-ds student step at each of ``micro_batches``
    (profiled at the check's micro-batch), as rows of ``result[key]``; those rows."""
    s, rows = c.shape, c.result.setdefault(key, [])
    plain = c.call("plain step", lambda: plain_steps(c.paths["student"], c.data, s["seq_len"], micro_batches,
                                                     c.device, c.dtype, s["step_steps"], c.peak_flops(c.dtype),
                                                     plain_settings(c.config)))
    for mb in micro_batches:
        rows.append(engine_step(c, "lm", "ted-ds", mb, [], s["profile_steps"] if mb == s["micro_batch"] else 0))
        if "profile" in rows[-1]:
            c.result["student_profile"] = rows[-1].pop("profile")
        if plain:
            rows.append({"variant": "plain", "micro_batch": mb, "overrides": [], **plain[mb]})
        c.save()
    return rows


def plain_settings(config: str) -> dict:
    """What the plain step takes from the run ted-ds would make: learning rate, betas, eps, weight decay
    and the gradient clipping norm (``optim.*``)."""
    from ted_ds.config import load_run_config

    o = load_run_config(config, []).optim
    return {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "clip": o.grad_clip}


def student_summary(rows: list[dict], micro_batch: int) -> dict:
    """The headline figures of section C: the configured step's MFU at the check's micro-batch, its time
    ÷ the plain step's at each micro-batch and the fastest ted-ds settings."""
    timed = [r for r in rows if "step_s" in r]
    find = lambda variant, mb: next((r for r in timed if r["variant"] == variant and r["micro_batch"] == mb), None)
    ratios = {mb: find("ted-ds", mb)["step_s"] / find("plain", mb)["step_s"]
              for mb in sorted({r["micro_batch"] for r in timed}) if find("ted-ds", mb) and find("plain", mb)}
    configured = find("ted-ds", micro_batch) or {}
    ours = [r for r in timed if r["variant"] != "plain"]
    best = max(ours, key=lambda r: r["tokens_per_s"], default=None)
    return {"student_mfu": configured.get("mfu"), "student_vs_plain": ratios.get(micro_batch),
            "student_vs_plain_by_micro_batch": ratios,
            "best_student": best and {k: best[k] for k in ("variant", "micro_batch", "overrides")}}


CONFIGURED = {"variant": "ted-ds", "overrides": []}  # the TED step as a run is configured


def ted_section(c) -> None:
    """The TED step as configured, on random banks, at the real vocabulary (``ted_mfu``: teacher forward
    counted)."""
    settings = {**CONFIGURED, "micro_batch": c.shape["micro_batch"]}
    step = engine_step(c, "ted", settings["variant"], settings["micro_batch"], [*settings["overrides"],
                                                                                  *random_banks(c)])
    c.result.update({"ted_settings": settings, "ted_step": step, "ted_mfu": step.get("mfu")})
    c.save()


def documents_section(c) -> None:
    """The TED step of section ``ted`` with ``data.document_attention=true`` (``doc_attention_ratio``: its
    time ÷ the step without; the step without is measured here too when section ``ted`` has not run)."""
    if "step_s" not in (c.result.get("ted_step") or {}):
        ted_section(c)
    settings, plain = c.result["ted_settings"], c.result["ted_step"]
    documents = engine_step(c, "ted", settings["variant"] + " documents", settings["micro_batch"],
                            [*settings["overrides"], *random_banks(c), "data.document_attention=true"])
    c.result.update({"ted_documents_step": documents,
                     "doc_attention_ratio": documents["step_s"] / plain["step_s"]
                     if "step_s" in plain and "step_s" in documents else None})
    c.save()


def random_banks(c) -> list[str]:
    """Stage-1 banks of the shapes the run expects, with random weights (a step's speed does not depend
    on them), so that section D needs no stage 1; the overrides that point the run at them."""
    from ted_ds.config import load_run_config
    from ted_ds.filters import FilterBank, save_filter_bank
    from ted_ds.plan import Job, expected_bank, plan

    cfg, overrides = load_run_config(c.config, []), []
    for side in ("teacher", "student"):
        meta = expected_bank(plan(cfg, Job.learning_filters_of(side)), side)
        bank = FilterBank(meta["kind"], meta["in_dim"], meta["out_dim"], meta["layers"], model=meta["model"])
        path = os.path.join(c.work, f"random-bank-{side}")
        save_filter_bank(bank.state_dict(), bank.meta(), path)
        overrides.append(f"{side}.filters={path}")
    return overrides
