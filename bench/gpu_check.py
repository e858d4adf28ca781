"""The GPU check: the large-scale path end to end on one GPU, with the figures that matter, in
sections that fit short GPU slots.

    python -m bench.gpu_check [--work DIR] [--out DIR] [--sections a,b] [--budget-s S]   (make gpu-check)
    python -m bench.gpu_check --dry-run [...]         (CPU, tiny shapes, gloo: what the tests run)
    bash scripts/gpu_slot.sh [BUDGET_S] [RESULTS_DIR] (one command for one short GPU slot)

A random LLaMA-shaped teacher (~3.6 B: d=3072, 28 layers) and student (~1.2 B: d=2048, 16 layers, tied
embeddings), bf16 safetensors written here, at a real vocabulary: 128,256 rows in both and as many ids
in the data's tokenizer (a small BPE padded with ids text never produces), so that KD and the losses
run over a real run's vocabulary; ``ds_configs/zero3_bf16.json`` (DeepSpeed's fused AdamW).  Every
phase that trains is the real command or the engine worker (bench/mp_engine_bench.py) in its own
process; the attention kernels, the teacher forward and the plain PyTorch step are measured in this one.
Random weights: the losses mean nothing, the speed and memory do.

Resumable: ``--work`` (default .cache/gpu-check, kept) holds the data, the models (built for the
sections that need them only), compiled kernels and each finished section's figures
(bench/gpu_resume.py); a second call reuses them and runs what is left (``--redo`` measures again).
``--budget-s`` starts no section whose estimate (ESTIMATE_S) would end past the budget and prints one
line saying what is left.  Printed at the end: the figures, one summary line (the four headlines and
what ran, was reused, failed or is left) and one JSON object (``student_mfu``, ``student_vs_plain``,
``ted_mfu``, ``doc_attention_ratio`` always among its keys, None where their section did not run);
``--out`` also gets it as ``gpu_check.json``, saved after every phase.

Sections (``--sections``, comma-separated, default all, run in this order: headline figures first):
  student    the ted-ds student step (ZeRO-3, engine worker, ``distill.method=lm``) at the check's
             micro-batch, profiled by phase and kind of work, against a plain PyTorch step of the same
             model (fp32 master weights, bf16 autocast, ted-ds's chunked loss, clipping, fused AdamW):
             ``student_mfu``, ``student_vs_plain``
  ted        the TED step as configured, on random banks (``ted_mfu``, the teacher's forward counted)
  levers     both steps at the other micro-batches, then each lever alone: every parameter persistent,
             activation checkpointing, eager / flex attention, compiled blocks (``best_student``)
  documents  the TED step with data.document_attention (``doc_attention_ratio``: ÷ the step without)
  attention  SDPA causal, SDPA with ted_ds.documents' dense document mask (KV heads repeated, as
             transformers does with a mask) and FlexAttention with its BlockMask at T=4096 for both
             models' attention shapes: backend, ms, TFLOP/s of the work the mask leaves, error
  teacher    the frozen teacher's forward at micro-batch 1 and 2, document attention off and on
  kd         the chunked vs unchunked CE + KD loss (bench/kd_bench.py) at the check's vocabulary
  distill    stage 1, ~30 TED steps, export, eval, the engine bench under every teacher placement
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial

from bench.gpu_resume import changed, fingerprints, fits, left_line, load_done, save_done, shape_key
from bench.gpu_sections import (
    DS_CONFIG,
    attention_section,
    documents_section,
    levers_section,
    student_section,
    teacher_section,
    ted_section,
    worker,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data_prep", "sample", "enwiki_sample.txt.gz")
HEADLINES = ("student_mfu", "student_vs_plain", "ted_mfu", "doc_attention_ratio")  # always in the last line
WORK = os.path.join(REPO, ".cache", "gpu-check")  # --work's default: kept from one call to the next


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied)


SHAPES = {  # (teacher, student) LLaMA shapes and run sizes: full size on a GPU, tiny for the CPU dry run.
    # vocab: the models' rows and the data tokenizer's ids (a tokenizer_vocab BPE padded to it): KD and the
    # LM loss run over all of them, as at a real run's 128k vocabulary
    "gpu": dict(teacher=llama(3072, 8192, 28, 24, 8, tied=False), student=llama(2048, 8192, 16, 32, 8, tied=True),
                vocab=128256, tokenizer_vocab=4000, seq_len=2048, micro_batch=2, global_batch=4, filter_steps=10,
                distill_steps=30, bench_steps=6, kd_tokens=8192, taps=(7, 4), attention_seq=4096, documents=8,
                attention_calls=10, forward_steps=3, step_steps=4, micro_batches=(1, 2, 4), profile_steps=2),
    "dry": dict(teacher=llama(64, 128, 4, 4, 2, tied=False), student=llama(32, 64, 2, 2, 1, tied=True),
                vocab=1536, tokenizer_vocab=1000, seq_len=64, micro_batch=2, global_batch=4, filter_steps=2,
                distill_steps=3, bench_steps=2, kd_tokens=256, taps=(2, 1), attention_seq=128, documents=4,
                attention_calls=2, forward_steps=1, step_steps=2, micro_batches=(1, 2), profile_steps=1),
}


def run(cmd: list[str], log: list, what: str, env: dict | None = None) -> str | None:
    """Run one phase; its time, exit status and (on failure) output tail go to ``log``. Returns its
    stdout, or None when it failed: the phases that do not depend on it still run."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    record(log, what, start, proc.returncode, proc.stdout + proc.stderr)
    return proc.stdout if proc.returncode == 0 else None


def record(log: list, what: str, start: float, rc: int, output: str) -> None:
    """A finished phase in ``log`` (and on the console): its time, exit status and, failed, its output's tail."""
    entry = {"phase": what, "seconds": round(time.perf_counter() - start, 1), "rc": rc}
    if rc != 0:
        entry["tail"] = output[-3000:]
    log.append(entry)
    print(f"[{what}] {entry['seconds']} s, exit {rc}", flush=True)
    if rc != 0:
        print(entry["tail"], flush=True)


def make_model(shape: dict, side: str, tok_dir: str, path: str, device: str) -> None:
    """A random ``side`` model saved as bf16 safetensors in ``path`` (initialised on ``device``: fast),
    with the data's tokenizer; the memory it took is handed back before the phases after it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    config = LlamaConfig(vocab_size=shape["vocab"], max_position_embeddings=max(4096, shape["seq_len"]),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape[side])
    torch.manual_seed(0 if side == "teacher" else 1)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pad_vocabulary(tok_dir: str, size: int) -> None:
    """Pad the BPE tokenizer in ``tok_dir`` to ``size`` ids with tokens that text never produces, so that
    the data's vocabulary (what KD and the losses run over) is a real run's, not the small BPE's."""
    path = os.path.join(tok_dir, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    taken = 1 + max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens") or [])])
    vocab.update({f"<unused_{i}>": i for i in range(taken, size)})
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)


def run_config(shape: dict, work: str, paths: dict, ds_config: str) -> str:
    import yaml

    k_t, k_s = shape["taps"]
    cfg = {"teacher": {"path": paths["teacher"], "placement": "replicated",
                       "filters": os.path.join(work, "filters-teacher")},
           "student": {"path": paths["student"], "filters": os.path.join(work, "filters-student")},
           "data": {"path": os.path.join(work, "data"), "seq_len": shape["seq_len"], "eval_samples": 8},
           "distill": {"method": "ted", "teacher_every": k_t, "student_every": k_s},
           "optim": {"lr": 1e-4, "warmup_steps": 2},
           "train": {"out_dir": os.path.join(work, "run"), "deepspeed_config": ds_config,
                     "micro_batch_size": shape["micro_batch"], "global_batch_size": shape["global_batch"],
                     "steps": shape["distill_steps"], "log_interval": 5, "eval_interval": 10**6,
                     "save_interval": 10**6, "progress": False}}
    path = os.path.join(work, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def last_metrics(out_dir: str) -> dict:
    """The last logged training step of a run (metrics.jsonl)."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r for r in rows if "tokens_per_s" in r][-1]


def parameters(path: str) -> int:
    """Parameter count of an HF directory, read from its safetensors headers."""
    import math

    from ted_ds.weights import WeightReader

    reader = WeightReader(path)
    return sum(math.prod(reader.shape(name)) for name in reader.names())


@dataclass
class Check:
    """One run of the check: its sizes, work directory and environment. ``log`` gets every phase,
    ``result`` every figure; ``save`` after each phase, so that a cut-off run still reports what it
    measured."""

    shape: dict
    work: str  # this shape's directory under --work: data, models, results (gpu_resume)
    dry_run: bool
    out: str | None
    config: str = ""  # the distillation run's YAML (run_config), once data and a model exist
    log: list = field(default_factory=list)
    result: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)  # peak FLOP/s by dtype, found once

    @property
    def env(self) -> dict:
        return {"DS_ACCELERATOR": "cpu"} if self.dry_run else {}

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    @property
    def dtype(self):
        """What the in-process measurements compute in: bf16 on the GPU, fp32 on the CPU (exact comparisons)."""
        import torch

        return torch.float32 if self.dry_run else torch.bfloat16

    @property
    def data(self) -> str:
        return os.path.join(self.work, "data")

    @property
    def paths(self) -> dict:
        """The random teacher's and student's HF directories (built by the sections that need them)."""
        return {side: os.path.join(self.work, side) for side in ("teacher", "student")}

    @property
    def manifest(self) -> dict:
        from data_prep.format import read_manifest

        return read_manifest(self.data)

    def peak_flops(self, dtype) -> float:
        """The device's peak in ``dtype`` as the trainer finds it for MFU (ted_ds.metrics)."""
        from ted_ds.metrics import device_peak_flops

        if dtype not in self.peaks:
            self.peaks[dtype] = device_peak_flops(None, self.device, dtype)
        return self.peaks[dtype]

    def run(self, cmd: list[str], what: str) -> str | None:
        return run(cmd, self.log, what, self.env)

    def call(self, what: str, measure):
        """An in-process phase: ``measure()``'s result, or None when it raised (logged as a failed phase,
        the other phases still run); the GPU memory it cached is handed back for the phases after it."""
        import torch

        start, rc, output, result = time.perf_counter(), 0, "", None
        try:
            result = measure()
        except Exception:  # a phase's failure is a figure of the check, not its end
            rc, output = 1, traceback.format_exc()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        record(self.log, what, start, rc, output)
        return result

    def save(self) -> None:
        _save(self.result, self.out)


def build(c: Check, needs: tuple[str, ...]) -> bool:
    """What a section needs and this work directory lacks: "data" (the padded tokenizer and shards),
    "teacher", "student" (random models); then the run's config. True when all of it exists."""
    py, work, shape = sys.executable, c.work, c.shape
    tok = os.path.join(work, "tok")
    if "data" in needs and not os.path.isfile(os.path.join(c.data, "manifest.json")):
        if not os.path.isfile(os.path.join(tok, "tokenizer.json")) and run(
                [py, "-m", "data_prep", "tokenizer", "--input", SAMPLE, "--vocab-size", str(shape["tokenizer_vocab"]),
                 "--out", tok], c.log, "tokenizer") is None:
            return False
        pad_vocabulary(tok, shape["vocab"])
        if run([py, "-m", "data_prep", "build", "--input", SAMPLE, "--tokenizer", tok, "--out", c.data, "--workers",
                str(min(8, os.cpu_count() or 1)), "--no-progress"], c.log, "shards") is None:
            return False
    for side in ("teacher", "student"):
        path = c.paths[side]
        if side in needs and not os.path.isfile(os.path.join(path, "config.json")):
            c.call(f"random {side}", partial(make_model, shape, side, tok, path, "cpu" if c.dry_run else "cuda"))
        if side in needs and not os.path.isfile(os.path.join(path, "config.json")):
            return False
        if os.path.isfile(os.path.join(path, "config.json")):
            c.result[f"{side}_params"] = parameters(path)
    if os.path.isfile(os.path.join(c.data, "manifest.json")):
        c.config = run_config(shape, work, c.paths, DS_CONFIG)
    return True


def learn_filters(c: Check) -> bool:
    """TED stage 1 on both sides (a re-run reuses finished banks); True when both banks exist."""
    ted = [sys.executable, "-m", "ted_ds"]
    return all([os.path.isfile(os.path.join(c.work, f"filters-{side}", "filters.json")) or
                c.run([*ted, "learn-filters", "--config", c.config, "--model", side,
                       f"train.steps={c.shape['filter_steps']}", f"train.out_dir={c.work}/stage1-{side}",
                       f"distill.filters_out={c.work}/filters-{side}"], f"learn-filters {side}") is not None
                for side in ("teacher", "student")])


def distill(c: Check) -> None:
    """Stage 2 (its tokens/s, MFU and peak memory), the engine bench (replicated), export and eval."""
    ted, work = [sys.executable, "-m", "ted_ds"], c.work
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)  # a re-run measures afresh, never resumes
    c.result["floor_gib"] = floor_gib(c.shape, c.paths)
    if c.run([*ted, "distill", "--config", c.config, f"train.steps={c.shape['distill_steps']}"],
             "distill ted") is None:
        return
    trained = last_metrics(os.path.join(work, "run"))
    peak = trained.get("mem/peak_gib")
    c.result.update({"tokens_per_s": trained["tokens_per_s"], "mfu": trained["mfu"], "peak_gpu_gib": peak,
                     "peak_over_floor": peak / c.result["floor_gib"] if peak else None})
    c.save()
    engine_bench(c, "replicated")
    export = os.path.join(work, "export")
    if c.run([*ted, "export", os.path.join(work, "run"), "--out", export, "--dtype", "bf16"], "export") is not None:
        out = c.run([*ted, "eval", export, "--data", os.path.join(work, "data"), "--max-samples", "16",
                     "--seq-len", str(c.shape["seq_len"]), "--json"], "eval")
        if out:
            c.result["eval_ppl"] = json.loads(out.strip().splitlines()[-1])["ppl"]
    c.save()


def engine_bench(c: Check, placement: str) -> None:
    """The engine worker on the same batches: TED step, and (replicated) student step + teacher forward."""
    with_lm = ["--with-lm"] if placement == "replicated" else []
    e = worker(c, f"engine bench {placement}", [*with_lm, "--warmup", "2", "--steps", str(c.shape["bench_steps"])],
               [f"teacher.placement={placement}", "teacher.pipeline_stages=1"])
    if e is not None:
        c.result[f"ted_step_s_{placement}"] = e["step_s"]
        if with_lm:
            both = e["lm_step_s"] + e["teacher_forward_s"]
            c.result.update({"student_step_s": e["lm_step_s"], "teacher_forward_s": e["teacher_forward_s"],
                             "ted_over_student_plus_teacher": e["step_s"] / both})
    c.save()


def kd_bench(c: Check) -> None:
    """The chunked vs unchunked CE + KD loss (bench/kd_bench.py) at this check's vocabulary."""
    size = ["--quick"] if c.dry_run else ["--tokens", str(c.shape["kd_tokens"]), "--vocab", str(c.shape["vocab"])]
    kd = c.run([sys.executable, "-m", "bench", "kd", "--device", "cpu" if c.dry_run else "cuda", *size], "kd bench")
    if kd:
        c.result.update({k: v for k, v in json.loads(kd.strip().splitlines()[-1]).items() if k.startswith("kd_")})
    c.save()


def distill_section(c: Check) -> None:
    """The distillation run end to end: stage 1, stage 2, export, eval, the engine bench per placement."""
    if learn_filters(c):
        distill(c)
        for placement in ("zero3", "pipeline"):  # each placement's step on the device
            engine_bench(c, placement)
    c.save()


# name: (what it measures, what it needs built first), in the order they run: the headline figures
# first (student vs plain, the TED step at the real vocabulary), then the levers, then documents
SECTIONS = {"student": (student_section, ("data", "student")),
            "ted": (ted_section, ("data", "teacher", "student")),
            "levers": (levers_section, ("data", "student")),
            "documents": (documents_section, ("data", "teacher", "student")),
            "attention": (attention_section, ()),
            "teacher": (teacher_section, ("data", "teacher")),
            "kd": (kd_bench, ()),
            "distill": (distill_section, ("data", "teacher", "student"))}
# Seconds each section and each build is expected to take, for --budget-s. gpu: planning figures for a
# fresh H100 (data and models built; DeepSpeed import and ZeRO-3 build ~30-40 s per engine worker, fused
# Adam JIT-compiled by the first), not measurements; dry: seen on 2 CPU cores shared with other jobs,
# DeepSpeed's CPU Adam already compiled.
ESTIMATE_S = {"gpu": {"student": 200, "ted": 90, "levers": 420, "documents": 90, "attention": 40, "teacher": 60,
                      "kd": 40, "distill": 450, "data": 40, "teacher model": 60, "student model": 30},
              "dry": {"student": 45, "ted": 40, "levers": 350, "documents": 45, "attention": 10, "teacher": 20,
                      "kd": 40, "distill": 420, "data": 10, "teacher model": 10, "student model": 10}}


def sections(text: str) -> list[str]:
    """``--sections``: names from SECTIONS, comma-separated, run in SECTIONS' order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if not names or names - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"choose among {', '.join(SECTIONS)} (got {text!r})")
    return [n for n in SECTIONS if n in names]


def estimate(c: Check, name: str) -> float:
    """Seconds section ``name`` is expected to take here, with the builds it needs that are missing."""
    table = ESTIMATE_S["dry" if c.dry_run else "gpu"]
    needs = SECTIONS[name][1]
    missing = [n for n in needs if n == "data" and not os.path.isfile(os.path.join(c.data, "manifest.json"))]
    missing += [f"{n} model" for n in needs if n in c.paths and not os.path.isfile(os.path.join(c.paths[n],
                                                                                                 "config.json"))]
    return table[name] + sum(table[n] for n in missing)


def run_section(c: Check, name: str) -> str:
    """Section ``name`` with what it needs built; its figures kept (gpu_resume) unless a phase failed.
    Returns "ran" or "failed"."""
    function, needs = SECTIONS[name]
    first, before = len(c.log), fingerprints(c.result)
    if build(c, needs):
        function(c)
    phases = c.log[first:]
    if not phases or any(p["rc"] for p in phases):
        return "failed"
    save_done(c.work, name, changed(before, c.result), phases)
    return "ran"


def run_sections(c: Check, names: list[str], budget_s: float | None, redo: set[str]) -> dict[str, list[str]]:
    """Each section in order: reused when this work directory holds its figures (and it is not in
    ``redo``), else run while ``budget_s`` allows; the sections by what became of them."""
    start, status, stopped = time.perf_counter(), {"ran": [], "reused": [], "failed": [], "left": []}, None
    for name in names:
        done = None if name in redo else load_done(c.work, name)
        if done is not None:
            c.result.update(done["figures"])
            c.log.append({"phase": name, "reused": True, "rc": 0})
            print(f"[{name}] reused ({c.work}/results/{name}.json)", flush=True)
            status["reused"].append(name)
        elif stopped or not fits(estimate(c, name), budget_s, time.perf_counter() - start):
            stopped = stopped or (name, estimate(c, name), time.perf_counter() - start)
            status["left"].append(name)
        else:
            status[run_section(c, name)].append(name)
        c.result["sections"] = status
        c.save()
    if stopped:
        name, need, elapsed = stopped
        print(left_line(budget_s, elapsed, name, need, status["left"], os.path.dirname(c.work)), flush=True)
    return status


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, gloo (what the tests run)")
    ap.add_argument("--work", default=WORK, help=f"work directory, kept: models, data, compiled kernels and each "
                                                 f"finished section's figures, reused by the next call ({WORK})")
    ap.add_argument("--out", default=None, help="also write gpu_check.json here")
    ap.add_argument("--sections", type=sections, default=list(SECTIONS),
                    help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)}; see above)")
    ap.add_argument("--redo", type=sections, default=[], help="sections to measure again though their figures exist")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no section that would end past this many seconds; say what is left")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary of the models and data (GPU default 128256)")
    args = ap.parse_args(argv)
    smallest = SHAPES["dry" if args.dry_run else "gpu"]["tokenizer_vocab"]
    if args.vocab is not None and args.vocab < smallest:
        ap.error(f"--vocab {args.vocab} is below the check's tokenizer of {smallest} ids")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device visible; use --dry-run on a CPU machine")
    c = check_for(args)
    status = run_sections(c, args.sections, args.budget_s, set(args.redo))
    report(c.result, summary_line(c.result, status))
    if status["failed"]:
        sys.exit(f"gpu-check: failed phases: {', '.join(p['phase'] for p in c.log if p['rc'])}")
    return c.result


def check_for(args) -> Check:
    """The check of these arguments: its shape's directory under ``--work`` (another shape, another
    directory), compiled kernels cached beside it for every call and process."""
    import torch

    shape = dict(SHAPES["dry" if args.dry_run else "gpu"])
    if args.vocab:
        shape["vocab"] = args.vocab
    work = os.path.join(os.path.abspath(args.work), ("dry-" if args.dry_run else "gpu-") + shape_key(shape))
    os.makedirs(work, exist_ok=True)
    caches = {"TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".cache", "torch_extensions"),  # as the Makefile sets it
              "TORCHINDUCTOR_CACHE_DIR": os.path.join(os.path.abspath(args.work), "inductor"),
              "TRITON_CACHE_DIR": os.path.join(os.path.abspath(args.work), "triton")}
    for var, path in caches.items():
        os.environ.setdefault(var, path)
    c = Check(shape, work, args.dry_run, args.out)
    c.result = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0), "vocab": shape["vocab"],
                "work": work, **dict.fromkeys(HEADLINES), "phases": c.log}
    return c


def summary_line(r: dict, status: dict[str, list[str]]) -> str:
    """One line: the four headline figures and what became of each section."""
    figures = " ".join(f"{k}={number(r.get(k), '.3f')}" for k in HEADLINES)
    return (f"gpu-check summary: {figures} "
            + " ".join(f"{what}={','.join(names) or '-'}" for what, names in status.items()))


def floor_gib(shape: dict, paths: dict) -> float:
    """What the distillation run must hold on its one GPU (ted_ds.capacity's floor, replicated teacher)."""
    import torch

    from ted_ds.architectures import load_hf_config
    from ted_ds.capacity import rank_floor_bytes, reduce_bucket_elements

    with open(DS_CONFIG) as f:
        bucket = reduce_bucket_elements(json.load(f))
    floor = rank_floor_bytes(load_hf_config(paths["teacher"]), load_hf_config(paths["student"]), "replicated", 1, 1,
                             None, torch.bfloat16, shape["micro_batch"] * shape["seq_len"], bucket)
    return floor / 2**30


def _save(result: dict, out: str | None) -> None:
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=2)


def number(value: float | None, spec: str) -> str:
    """A figure as printed: "-" where there is none (a section not run, no MFU for an unknown GPU)."""
    return "-" if value is None else format(value, spec)


def report(r: dict, summary: str) -> None:
    fmt = lambda key, spec: number(r.get(key), spec)
    size = lambda key: f"{r[key] / 1e9:.2f} B" if r.get(key) else "not built"
    print(f"\nteacher {size('teacher_params')}, student {size('student_params')}, vocabulary {r['vocab']} on "
          f"{r['device']}")
    print(f"tokens/s {fmt('tokens_per_s', '.0f')}, MFU {fmt('mfu', '.3f')} (teacher forward counted)")
    print(f"TED step / (student step + teacher forward) = {fmt('ted_over_student_plus_teacher', '.3f')}")
    print(f"peak GPU memory {fmt('peak_gpu_gib', '.1f')} GiB / floor {fmt('floor_gib', '.1f')} GiB = "
          f"{fmt('peak_over_floor', '.2f')}")
    print(f"KD chunked/unchunked: memory {fmt('kd_memory_ratio', '.2f')}, time {fmt('kd_time_ratio', '.2f')}")
    report_attention(r.get("attention") or {})
    report_steps(r)
    print(f"student MFU {fmt('student_mfu', '.3f')}, ted-ds / plain step {fmt('student_vs_plain', '.2f')}, "
          f"TED MFU {fmt('ted_mfu', '.3f')}, TED step with / without documents {fmt('doc_attention_ratio', '.2f')}")
    print(summary)
    print(json.dumps({k: v for k, v in r.items() if k != "phases"}))


def report_attention(attention: dict) -> None:
    for side, a in attention.items():
        if a is None:
            continue
        print(f"\nattention, {side}: {a['batch']} × {a['seq_len']} tokens, {a['heads']} heads ({a['kv_heads']} kv) × "
              f"{a['head_dim']}, {a['documents_per_row']} documents a row, {a['dtype']}")
        for name in ("causal", "document_dense", "document_flex"):
            v = a[name]
            kernel = v.get("backend") or ("flex, compiled" if v.get("compiled") else "flex")
            print(f"  {name:<16}{kernel:<22}{v['ms']:>10.3f} ms{v['tflops']:>9.2f} TFLOP/s   "
                  f"max abs err {v['max_abs_err']:.1e}")


def report_steps(r: dict) -> None:
    for row in r.get("teacher_forward") or []:
        documents = "on " if row["document_attention"] else "off"
        print(f"teacher forward, {row['attn_implementation']:<15} documents {documents} mb {row['micro_batch']}: "
              f"{row['ms_per_4096_tokens']:.1f} ms / 4096 tokens, MFU {number(row['mfu'], '.3f')}")
    for row in [*(r.get("student_steps") or []), *(r.get("lever_steps") or [])]:
        head = f"student step {row['variant']:<25} mb {row['micro_batch']}: "
        if "step_s" not in row:
            print(head + row.get("skipped", "failed"))
            continue
        memory = f", peak {row['peak_gpu_gib']:.1f} GiB" if row.get("peak_gpu_gib") is not None else ""
        print(head + f"{row['step_s']:.4f} s, {row['tokens_per_s']:.0f} tokens/s, MFU {number(row['mfu'], '.3f')}"
                     f"{memory}")
    if r.get("student_profile"):
        from bench.profile_bench import report as profile_report

        print("profile of the ted-ds student step:\n" + profile_report(r["student_profile"]))


if __name__ == "__main__":
    main()
