"""Does KD across tokenizers help? A pre-registered comparison in held-out bits per byte (issue 38).

    python bench/crosstok_study.py [--quick] [--seeds 4] [--jobs 2] [--out bench/results/crosstok]

This design, its sizes and its decision rule were committed before any of its runs (git log of this file).

1. Data: the Wikipedia sample (../shared/data/enwiki_sample.txt when present, else the bundled copy, the
   same text). Two tokenizers trained by ``ted-prep tokenizer`` on it, as in the README's walk-through:
   the **teacher's** a 4k BPE SentencePiece, the **student's** a 3k unigram SentencePiece. Each builds its
   own shards of the same text (``ted-prep build``, valid fraction 3 %): the split is by a hash of each
   document's text, so both valid splits hold the same documents. Held-out text = that valid split.
2. The teacher: LLaMA-style, 4 layers, d = 128, pre-trained from scratch with ``method: lm`` on its own
   (BPE) shards for 400 steps (lr 3e-3 → 3e-4).
3. The student: LLaMA-style, 2 layers, d = 64, trained from a fresh initialisation (``train.seed``) for
   300 steps (lr 1e-3 → 1e-4, 30 warm-up steps), 16 windows of 128 tokens per step. "Same architecture"
   across tokenizers means the same layers and widths: the embedding and the head have the tokenizer's
   rows (3k or 4k).
4. Arms, seeds 1–4 (a seed fixes the student's initialisation and its data order; arms of one tokenizer
   pair exactly):

   ``lm``                the student (3k unigram) with no teacher: ``method: lm``
   ``chunk_likelihood``  the student with cross-tokenizer KD, ``distill.cross_tokenizer: chunk_likelihood``
   ``overlap_kl``        the student with cross-tokenizer KD, ``distill.cross_tokenizer: overlap_kl``
   ``ref-lm``            the same architecture on the teacher's tokenizer (4k BPE), no teacher
   ``ref-kd``            the same architecture on the teacher's tokenizer, plain KD (``method: kd``)

   Every KD arm at the defaults, not tuned: α = 1, T = 2, forward KL. Cross-tokenizer **TED** is not
   built yet (the config refuses ``method: ted`` with ``distill.cross_tokenizer``): it is not an arm of
   this study; a later study adds it.
5. Metric: the trainer's own eval at the last step, ``eval/bits_per_byte`` over every window of the
   valid split (``data.eval_samples`` above the window count): the summed NLL in bits over the UTF-8
   bytes the windows' targets spell (ted_ds.evaluate.target_bytes; an EOS is one byte). Bits per byte
   compares the two tokenizers; a window's tail past the last full window is left out of both.

**Decision rule** (pre-registered), per cross-tokenizer loss X ∈ {chunk_likelihood, overlap_kl}, judged
apart (two claims, each at 95 %, no correction), paired t intervals over the 4 seeds:

* **beats no teacher**: the 95 % interval of X − lm (bits/byte) lies entirely below 0.
* **recovery** R = mean(lm − X) / mean(ref-lm − ref-kd): the share of what same-tokenizer KD gains that
  X gains. Ruled on only if same-tokenizer KD's own gain is shown (the interval of ref-kd − ref-lm below
  0); otherwise "reference gain not shown: recovery not ruled on". "Recovers ≥ 50 %" when R ≥ 0.5;
  "shown at 95 %" in addition when the interval of ½(ref-lm − ref-kd) − (lm − X) lies below 0.
* **Goal met for X** when it beats no teacher and recovers ≥ 50 %; otherwise "not met", with which part
  failed. A run that did not finish makes its loss "not run", never ruled on from a part.
* Reported, not ruled on: the bits/byte of every arm (mean, sd), the teacher's own, X − X' between the
  two losses, and the seconds per training step of each arm (the alignment's cost in the data path).

Budget: ≤ 45 min on 2 cores (two single-process runs at a time, one thread each). A 15-step probe of each
run kind on the shared machine (before this design was committed; no study run) measured 0.3 s/step for a
no-teacher arm, 0.7 s/step for a KD arm of either kind and ~17 s of start-up, export and eval per run:
about 30 min for the 20 student runs, 6 min for the teacher.
``--quick`` shrinks everything (a corpus slice, tiny models, two seeds, a few steps) to check the pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import forked  # noqa: E402
from bench.common import REPO, corpus_path, machine, run  # noqa: E402
from bench.repro_runs import llama_config, metrics, write_yaml  # noqa: E402
from bench.repro_study import interval  # noqa: E402

FULL = {"teacher_vocab": 4000, "student_vocab": 3000, "valid_fraction": 0.03, "corpus_lines": None,
        "teacher_layers": 4, "hidden": 128, "heads": 4, "teacher_steps": 400,
        "student_layers": 2, "student_hidden": 64, "student_steps": 300,
        "seq_len": 128, "micro": 8, "global": 16, "eval_samples": 100000}
QUICK = {"teacher_vocab": 1000, "student_vocab": 800, "valid_fraction": 0.05, "corpus_lines": 1200,
         "teacher_layers": 2, "hidden": 64, "heads": 4, "teacher_steps": 8,
         "student_layers": 1, "student_hidden": 32, "student_steps": 4,
         "seq_len": 32, "micro": 4, "global": 8, "eval_samples": 16}

STUDENT = "student"  # the student's tokenizer (unigram); REF: the teacher's (BPE)
REF = "teacher"
ARMS = {"lm": (STUDENT, ("distill.method=lm",)),
        "chunk_likelihood": (STUDENT, ("distill.method=kd", "distill.cross_tokenizer=chunk_likelihood")),
        "overlap_kl": (STUDENT, ("distill.method=kd", "distill.cross_tokenizer=overlap_kl")),
        "ref-lm": (REF, ("distill.method=lm",)),
        "ref-kd": (REF, ("distill.method=kd",))}
CROSS = ("chunk_likelihood", "overlap_kl")


# ----------------------------------------------------------------------------- data, models, runs
def prepare(work: str, size: dict, corpus: str | None) -> dict:
    """Each side's tokenizer and its shards of the same text (``corpus``, default the Wikipedia sample); the
    models' configs."""
    corpus = corpus or corpus_path(work)
    if size["corpus_lines"]:
        sliced = os.path.join(work, "corpus-slice.txt")
        with open(corpus, encoding="utf-8") as f, open(sliced, "w", encoding="utf-8") as g:
            g.writelines(line for _, line in zip(range(size["corpus_lines"]), f))
        corpus = sliced
    models = {STUDENT: ("unigram", size["student_vocab"]), REF: ("bpe", size["teacher_vocab"])}
    out = {}
    for side, (kind, vocab) in models.items():
        tok, data = os.path.join(work, f"tok-{side}"), os.path.join(work, f"data-{side}")
        if not os.path.isdir(tok):
            run([sys.executable, "-m", "data_prep", "tokenizer", "--input", corpus, "--vocab-size", str(vocab),
                 "--model-type", kind, "--out", tok])
        if not os.path.isdir(data):
            run([sys.executable, "-m", "data_prep", "build", "--input", corpus, "--tokenizer", tok, "--out", data,
                 "--valid-fraction", str(size["valid_fraction"]), "--workers", "2", "--no-progress"])
        student = llama_config(work, f"student-{side}", tok, size, size["student_layers"], size["student_hidden"])
        out[side] = {"tokenizer": tok, "data": data, "student": student}
    out["teacher_config"] = llama_config(work, "teacher", out[REF]["tokenizer"], size)
    return out


def base_config(work: str, size: dict) -> str:
    """The study's run config; each run sets its data, student and method by overrides."""
    steps = size["student_steps"]
    return write_yaml({
        "teacher": {"path": f"{work}/teacher/hf"},
        "student": {"init_from_teacher": None},
        "data": {"seq_len": size["seq_len"], "eval_samples": size["eval_samples"]},
        "distill": {"method": "lm", "alpha": 1.0, "temperature": 2.0},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, steps // 10)},
        "train": {"micro_batch_size": size["micro"], "global_batch_size": size["global"], "steps": steps,
                  "log_interval": 1, "eval_interval": 10**6, "save_interval": 10**6, "progress": False,
                  "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json")}},
        os.path.join(work, "run.yaml"))


def train(config: str, out_dir: str, overrides: list[str], threads: int) -> None:
    """One single-process run (resumable: a finished run leaves DONE and is not run again)."""
    if os.path.isfile(os.path.join(out_dir, "DONE")):
        return
    forked.ted_ds(["distill", "--config", config, *overrides, f"train.out_dir={out_dir}"],
                  {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}, timeout=7200)
    open(os.path.join(out_dir, "DONE"), "w").close()


def arm_overrides(built: dict, arm: str, seed: int) -> list[str]:
    side, settings = ARMS[arm]
    return [f"data.path={built[side]['data']}", f"student.config={built[side]['student']}", *settings,
            f"train.seed={seed}"]


def run_all(work: str, size: dict, seeds: list[int], jobs: int, corpus: str | None = None) -> dict:
    """The teacher, then every arm × seed, ``jobs`` at a time."""
    built = prepare(work, size, corpus)
    config = base_config(work, size)
    steps = size["teacher_steps"]
    train(config, f"{work}/teacher", [f"data.path={built[REF]['data']}", f"student.config={built['teacher_config']}",
                                      "optim.lr=3e-3", "optim.min_lr=3e-4", f"train.steps={steps}",
                                      f"optim.warmup_steps={max(1, steps // 20)}"], threads=2)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(train, config, f"{work}/seed{seed}/{arm}", arm_overrides(built, arm, seed), threads)
                   for seed in seeds for arm in ARMS]
        for f in futures:
            f.result()
    return built


# ----------------------------------------------------------------------------- results and the rule
def final_eval(out_dir: str) -> dict:
    """The run's last eval (bits/byte, nats/token) and its mean seconds per training step."""
    rows = metrics(out_dir)
    last = [r for r in rows if "eval/bits_per_byte" in r][-1]
    seconds = [1 / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"bits_per_byte": last["eval/bits_per_byte"], "loss": last["eval/loss"],
            "s_per_token": statistics.mean(seconds) if seconds else float("nan")}


def decide(bpb: dict[str, list[float]]) -> dict:
    """The pre-registered rule (module docstring) on per-seed bits/byte of every arm."""
    ref_gain = interval([k - m for k, m in zip(bpb["ref-kd"], bpb["ref-lm"])])
    out = {"reference_gain": ref_gain}
    for x in CROSS:
        beats = interval([c - m for c, m in zip(bpb[x], bpb["lm"])])
        gain = statistics.mean(m - c for m, c in zip(bpb["lm"], bpb[x]))
        recovery = gain / -ref_gain["mean"] if ref_gain["mean"] else math.nan
        half = interval([0.5 * (rm - rk) - (m - c) for rm, rk, m, c in
                         zip(bpb["ref-lm"], bpb["ref-kd"], bpb["lm"], bpb[x])])
        if ref_gain["high"] >= 0:
            recovered = "reference gain not shown: recovery not ruled on"
        else:
            recovered = ("recovers ≥ 50 %" + (" (shown at 95 %)" if half["high"] < 0 else "")
                         if recovery >= 0.5 else "recovers < 50 %")
        met = beats["high"] < 0 and ref_gain["high"] < 0 and recovery >= 0.5
        failed = [why for why, bad in (("does not beat no teacher", beats["high"] >= 0),
                                       (recovered, not recovered.startswith("recovers ≥"))) if bad]
        out[x] = {"vs_no_teacher": beats, "recovery": recovery, "half_recovery": half, "recovered": recovered,
                  "goal": "met" if met else "not met: " + "; ".join(failed)}
    return out


def collect(work: str, seeds: list[int]) -> dict:
    runs = {arm: [final_eval(f"{work}/seed{s}/{arm}") for s in seeds] for arm in ARMS}
    bpb = {arm: [r["bits_per_byte"] for r in rs] for arm, rs in runs.items()}
    return {"runs": runs, "teacher": final_eval(f"{work}/teacher"), "decision": decide(bpb),
            "cross_difference": interval([c - o for c, o in zip(bpb["chunk_likelihood"], bpb["overlap_kl"])])}


def report(result: dict) -> str:
    lines = ["| arm | bits/byte (mean ± sd over seeds) | nats/token | ms/token |", "|---|---|---|---|"]
    for arm, rs in result["runs"].items():
        b = [r["bits_per_byte"] for r in rs]
        sd = statistics.stdev(b) if len(b) > 1 else float("nan")
        lines.append(f"| {arm} | {statistics.mean(b):.4f} ± {sd:.4f} | {statistics.mean(r['loss'] for r in rs):.4f} "
                     f"| {1e3 * statistics.mean(r['s_per_token'] for r in rs):.3f} |")
    t = result["teacher"]
    lines.append(f"| teacher (4 layers, its BPE) | {t['bits_per_byte']:.4f} | {t['loss']:.4f} | |")
    d = result["decision"]
    g = d["reference_gain"]
    lines.append(f"\nsame-tokenizer KD gain (ref-kd − ref-lm): {g['mean']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]")
    for x in CROSS:
        v = d[x]["vs_no_teacher"]
        lines.append(f"{x}: − lm {v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] ({v['verdict']}); recovery "
                     f"{d[x]['recovery']:.2f}: {d[x]['recovered']}; goal {d[x]['goal']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default 4; 2 with --quick)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--corpus", help="the text, one document a line (default: the Wikipedia sample)")
    p.add_argument("--out", help="results (default bench/results/crosstok, or crosstok-quick); runs in <out>/work")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    seeds = list(range(1, (args.seeds or (2 if args.quick else 4)) + 1))
    out = args.out or os.path.join(REPO, "bench", "results", "crosstok-quick" if args.quick else "crosstok")
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    start = time.time()
    run_all(work, size, seeds, args.jobs, args.corpus)
    result = {"machine": machine(), "size": size, "seeds": seeds, **collect(work, seeds),
              "wall_s": time.time() - start}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(report(result))
    return result


if __name__ == "__main__":
    main()
