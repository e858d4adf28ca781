"""TED vs KD on real English text, end to end: a 2 × 2 of method × α with paired seeds (study v5).

    python bench/repro.py [--quick] [--seeds 5] [--jobs 2] [--out bench/results/repro]

The claim (Liang et al., 2023): a TED student beats KD of the same student under the same budget.
This version fixes its design before it is run (the rule below was committed before the numbers):

1. data: the Wikipedia sample (../shared/data/enwiki_sample.txt when present, else the bundled copy)
   for training, its valid split (2 % of documents); the **test split** is the bundled public-domain
   books sample, a corpus the teacher never trained on (90 % of its documents, evaluated in-run as a
   blend source of weight 0: never trained on);
2. a LLaMA-style teacher (6 layers, d=192, 4k vocabulary) pre-trained with ``distill.method=lm``;
3. the student: 3 layers, d=192, initialised from teacher blocks 2, 4, 6 (1-based; the blocks its
   blocks are matched to: every 2nd teacher layer ↔ every student layer);
4. per seed, stage 1 (both banks, ``distill.filter_head=teacher``) is learned again, so the interval
   includes it; then every arm trains 200 steps (same data order per seed across arms: they pair):

   ``kd-a1``, ``kd-a4``      KD at α = 1 and α = 4
   ``ted-a1``, ``ted-a4``    TED (β = 1, normalized MSE) at α = 1 and α = 4
   ``lwd-identity-a1``       LWD (α = 1, β = 1) with an identity-initialised student map
   ``ted-cosine-a1``         TED (α = 1, β = 1) with the cosine layer loss: 1 − cos per token is half the
                             MSE between the states after a gain-free RMSNorm, so it sees what the
                             stage-1 head (the teacher's final RMSNorm + unembedding) saw, up to the gain
   ``kd-a1-matched``         KD at α = 1 with as many steps as TED α = 1 costs: measured seconds of both
                             stage-1 banks and TED's 200 steps ÷ KD's seconds per step (median over seeds)

5. evaluated in-run on both splits at steps 40, 100 and 200 (the matched arm also at its last step):
   mean next-token loss in nats per token over the same windows for every arm.

**Decision rule** (pre-registered). Primary metric: books test loss at step 200. Per seed, the TED main
effect at matched α is M = ½[(ted-a1 − kd-a1) + (ted-a4 − kd-a4)]. "TED is worth it here" only if the
95 % paired t interval of M (n = seeds) lies entirely below 0 **and** the 95 % paired t interval of
ted-a1 − kd-a1-matched lies entirely below 0. Otherwise: "not shown here". Everything else (the α
effect, the interaction, steps 40/100, Wikipedia valid, LWD and the cosine loss) is reported, not ruled on.

--quick shrinks everything (tiny models, a corpus slice, two seeds, a few steps) to check the pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, corpus_path, machine, run  # noqa: E402
from ted_ds.launch import local_deepspeed_command as deepspeed  # noqa: E402

BOOKS = os.path.join(REPO, "data_prep", "sample", "books_sample.txt.gz")
SPLITS = ("books", "wikipedia")  # the blend's sources: books (weight 0) is the test split

FULL = {"vocab": 4096, "teacher_layers": 6, "hidden": 192, "heads": 4, "seq_len": 128, "micro": 8, "global": 16,
        "teacher_steps": 600, "filter_steps": 40, "student_steps": 200, "eval_steps": (40, 100, 200),
        "student_layers": 3, "corpus_lines": None, "eval_samples": 1024}
QUICK = {"vocab": 1000, "teacher_layers": 4, "hidden": 64, "heads": 4, "seq_len": 32, "micro": 2, "global": 8,
         "teacher_steps": 20, "filter_steps": 3, "student_steps": 6, "eval_steps": (2, 4, 6), "student_layers": 2,
         "corpus_lines": 1500, "eval_samples": 32}

TED = ("distill.method=ted", "distill.beta=1.0")
ARMS = {"kd-a1": ("distill.method=kd", "distill.alpha=1.0"),
        "kd-a4": ("distill.method=kd", "distill.alpha=4.0"),
        "ted-a1": (*TED, "distill.alpha=1.0"),
        "ted-a4": (*TED, "distill.alpha=4.0"),
        "lwd-identity-a1": ("distill.method=lwd", "distill.beta=1.0", "distill.alpha=1.0",
                            "distill.lwd_map_init=identity"),
        "ted-cosine-a1": (*TED, "distill.alpha=1.0", "distill.layer_loss=cosine"),
        "kd-a1-matched": ("distill.method=kd", "distill.alpha=1.0")}
MATCHED = "kd-a1-matched"  # trains for the measured steps of TED α = 1, after the other arms


# ----------------------------------------------------------------------------- data and models
def prepare_data(out: str, size: dict, corpus: str | None) -> dict:
    """Tokenizer and shards of the training corpus; the books test split as a second build."""
    corpus = corpus or corpus_path(out)
    if size["corpus_lines"]:
        sliced = os.path.join(out, "corpus-slice.txt")
        if not os.path.exists(sliced):  # written once: a re-run finds the same source and its built shards
            with open(corpus, encoding="utf-8") as f, open(sliced, "w", encoding="utf-8") as g:
                for _, line in zip(range(size["corpus_lines"]), f):
                    g.write(line)
        corpus = sliced
    tok, data, test = (os.path.join(out, d) for d in ("tokenizer", "data", "books"))
    if not os.path.isdir(tok):
        run([sys.executable, "-m", "data_prep", "tokenizer", "--input", corpus, "--vocab-size", str(size["vocab"]),
             "--out", tok])
    build = [sys.executable, "-m", "data_prep", "build", "--tokenizer", tok, "--workers", "2", "--no-progress"]
    run([*build, "--input", corpus, "--out", data, "--valid-fraction", "0.02"])
    run([*build, "--input", BOOKS, "--out", test, "--valid-fraction", "0.9"])  # evaluated: the valid split
    return {"tokenizer": tok, "wikipedia": data, "books": test}


def llama_config(out: str, name: str, tok: str, size: dict) -> str:
    from data_prep.tokenizer import load_tokenizer

    path = os.path.join(out, f"{name}_config.json")
    hidden = size["hidden"]
    with open(path, "w") as f:
        json.dump({"model_type": "llama", "vocab_size": len(load_tokenizer(tok)), "hidden_size": hidden,
                   "intermediate_size": hidden * 8 // 3 // 8 * 8, "num_hidden_layers": size["teacher_layers"],
                   "num_attention_heads": size["heads"], "num_key_value_heads": size["heads"],
                   "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1,
                   "eos_token_id": 2}, f)
    return path


def aligned_blocks(size: dict) -> list[int]:
    """0-based teacher blocks whose outputs student blocks 1..n are matched to: k-1, 2k-1, … (k = interval)."""
    k = size["teacher_layers"] // size["student_layers"]
    return [k * (i + 1) - 1 for i in range(size["student_layers"])]


def write_run_config(out: str, data: dict, size: dict) -> str:
    import yaml

    cfg = {"teacher": {"path": f"{out}/teacher/hf"},
           "student": {"init_from_teacher": aligned_blocks(size)},
           "data": {"sources": [{"name": "wikipedia", "path": data["wikipedia"], "weight": 1.0},
                                {"name": "books", "path": data["books"], "weight": 0.0}],
                    "seq_len": size["seq_len"], "eval_samples": size["eval_samples"]},
           "distill": {"method": "ted", "alpha": 1.0, "beta": 1.0, "temperature": 2.0,
                       "teacher_every": size["teacher_layers"] // size["student_layers"], "student_every": 1,
                       "layer_loss": "normalized_mse"},
           "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": max(1, size["student_steps"] // 10)},
           "train": {"micro_batch_size": size["micro"], "global_batch_size": size["global"], "steps": 1,
                     "log_interval": 1, "eval_interval": 10**6, "eval_steps": list(size["eval_steps"]),
                     "save_interval": 10**6, "progress": False,
                     "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json")}}
    path = os.path.join(out, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


class Launcher:
    """Runs training commands, ``jobs`` at a time, each with ``ranks`` processes sharing the cores."""

    def __init__(self, config: str, ranks: int, jobs: int):
        self.config, self.ranks, self.jobs = config, ranks, jobs

    def one(self, command: list[str], overrides: list[str], jobs: int = 1) -> None:
        out_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir="))
        if os.path.isfile(os.path.join(out_dir, "DONE")):  # a re-run after an interruption resumes the study
            return
        shutil.rmtree(out_dir, ignore_errors=True)
        threads = max(1, (os.cpu_count() or 1) // (self.ranks * jobs))
        run(deepspeed(self.ranks, "--module", "ted_ds", *command, "--config", self.config, *overrides),
            env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}, timeout=7200)
        open(os.path.join(out_dir, "DONE"), "w").close()

    def many(self, runs: list[tuple[list[str], list[str]]]) -> None:
        with ThreadPoolExecutor(self.jobs) as pool:
            for f in [pool.submit(self.one, command, overrides, jobs=self.jobs) for command, overrides in runs]:
                f.result()


# ----------------------------------------------------------------------------- the runs
def teacher_run(work: str, tok: str, size: dict):
    """The teacher, pre-trained from scratch with ``method: lm`` on Wikipedia."""
    steps = size["teacher_steps"]
    config = llama_config(work, "teacher", tok, size)
    return (["distill"], [f"student.config={config}", "student.init_from_teacher=null", "distill.method=lm",
                          "optim.lr=3e-3", "optim.min_lr=3e-4", f"train.out_dir={work}/teacher", f"train.steps={steps}",
                          f"optim.warmup_steps={max(1, steps // 20)}", f"train.eval_interval={steps}",
                          "train.eval_steps=[]"])


def bank(work: str, seed: int, which: str) -> str:
    return f"{work}/seed{seed}/filters-{which}"


def banks(work: str, seed: int) -> list[str]:
    return [f"teacher.filters={bank(work, seed, 'teacher')}", f"student.filters={bank(work, seed, 'student')}"]


def stage1_run(work: str, size: dict, seed: int, which: str):
    """One stage-1 bank of one seed, learned on the frozen model ``which`` (teacher | student)."""
    out = bank(work, seed, which)
    return (["learn-filters", "--model", which],
            [*banks(work, seed), f"distill.filters_out={out}", f"train.out_dir={out}-run",
             f"train.steps={size['filter_steps']}", "optim.lr=1e-2", f"train.seed={seed}",
             f"train.eval_interval={size['filter_steps']}", "train.eval_steps=[]"])


def arm_dir(work: str, seed: int, arm: str) -> str:
    return f"{work}/seed{seed}/{arm}"


def arm_run(work: str, size: dict, seed: int, arm: str, steps: int):
    overrides = list(ARMS[arm]) + (banks(work, seed) if "ted" in arm else [])
    return (["distill"], [*overrides, f"train.seed={seed}", f"train.steps={steps}",
                          f"train.out_dir={arm_dir(work, seed, arm)}"])


def metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_seconds(out_dir: str, tokens_per_step: int) -> float:
    """Seconds the run spent in training steps (evaluation, saving and start-up excluded), from its log."""
    return sum(tokens_per_step / r["tokens_per_s"] for r in metrics(out_dir) if "tokens_per_s" in r)


def matched_steps(work: str, size: dict, seeds: list[int]) -> dict:
    """KD α = 1's step count at TED α = 1's cost: per seed, (both stage-1 runs + TED's steps) in seconds
    over KD's seconds per step; the median over seeds, so every seed of the arm trains as long."""
    tokens = size["global"] * size["seq_len"]
    ratios = []
    for seed in seeds:
        ted = train_seconds(arm_dir(work, seed, "ted-a1"), tokens)
        stage1 = sum(train_seconds(bank(work, seed, w) + "-run", tokens) for w in ("teacher", "student"))
        kd_step = train_seconds(arm_dir(work, seed, "kd-a1"), tokens) / size["student_steps"]
        ratios.append({"seed": seed, "ted_s": ted, "stage1_s": stage1, "kd_step_s": kd_step,
                       "steps": (ted + stage1) / kd_step})
    return {"per_seed": ratios, "steps": round(statistics.median(r["steps"] for r in ratios))}


def evaluations(out_dir: str) -> dict[int, dict[str, float]]:
    """{step: {split: nats per token}} of every in-run evaluation."""
    return {r["step"]: {s: r[f"eval/{s}/loss"] for s in SPLITS} for r in metrics(out_dir) if "eval/books/loss" in r}


def train_curve(out_dir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["loss/lm"]) for r in metrics(out_dir) if "loss/lm" in r]


def stage1_taps(out_dir: str) -> dict[str, float]:
    """Per tap, the next-token loss of the filtered states: the mean of the last 5 logged steps."""
    rows = [r for r in metrics(out_dir) if "loss/total" in r]  # training steps, not evaluations
    keys = sorted((k for k in rows[-1] if k.startswith("loss/tap_lm/")), key=lambda k: int(k.split("L")[-1]))
    return {k.split("/")[-1]: statistics.mean(r[k] for r in rows[-5:]) for k in keys}


# ----------------------------------------------------------------------------- statistics and the rule
def paired_comparison(better: list[float], worse: list[float], confidence: float = 0.95,
                      power: float = 0.8) -> dict:
    """Paired t analysis of per-seed differences ``better − worse`` (negative favours ``better``).

    The verdict says "holds" only when the whole interval is below 0, "reversed" when it is above,
    and "no detectable difference" otherwise; ``detectable`` is the smallest true difference the
    same number of seeds would find with ``power`` (two-sided, at this spread)."""
    return interval([b - w for b, w in zip(better, worse)], confidence, power)


def interval(d: list[float], confidence: float = 0.95, power: float = 0.8) -> dict:
    """The paired t interval of per-seed differences ``d`` (see paired_comparison)."""
    from scipy import stats

    n = len(d)
    if n < 2:
        nan = float("nan")
        return {"n": n, "mean": d[0] if d else nan, "low": nan, "high": nan, "p": nan, "detectable": nan,
                "favourable": sum(x < 0 for x in d), "verdict": "no detectable difference (one seed)"}
    mean, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(n)
    t_crit = stats.t.ppf(1 - (1 - confidence) / 2, n - 1)
    low, high = mean - t_crit * se, mean + t_crit * se
    p = 2 * stats.t.sf(abs(mean) / se, n - 1) if se > 0 else float(mean == 0)
    verdict = "holds" if high < 0 else "reversed" if low > 0 else "no detectable difference"
    return {"n": n, "mean": mean, "low": low, "high": high, "p": p, "favourable": sum(x < 0 for x in d),
            "detectable": (t_crit + stats.t.ppf(power, n - 1)) * se, "verdict": verdict}


def final(scores: dict, arm: str, split: str = "books") -> list[float]:
    """Per seed, the arm's loss on ``split`` at its last evaluation (step 200; the matched arm's last step)."""
    return [by_step[max(by_step)][split] for by_step in scores[arm]]


def at(scores: dict, arm: str, step: int, split: str) -> list[float]:
    return [by_step[step][split] for by_step in scores[arm]]


def decide(scores: dict) -> dict:
    """The pre-registered rule on the books test split at step 200 (module docstring)."""
    ted1, kd1, ted4, kd4 = (final(scores, a) for a in ("ted-a1", "kd-a1", "ted-a4", "kd-a4"))
    main = interval([((t1 - k1) + (t4 - k4)) / 2 for t1, k1, t4, k4 in zip(ted1, kd1, ted4, kd4)])
    matched = paired_comparison(ted1, final(scores, MATCHED))
    worth = main["high"] < 0 and matched["high"] < 0
    return {"main_effect": main, "vs_compute_matched": matched,
            "outcome": "TED is worth it here" if worth else "not shown here"}


def effects(scores: dict, step: int, split: str) -> dict[str, dict]:
    """The 2 × 2's effects per seed at ``step`` on ``split``, and the secondary arms against TED α = 1."""
    get = {a: at(scores, a, step, split) for a in ("kd-a1", "kd-a4", "ted-a1", "ted-a4")}
    rows = list(zip(*(get[a] for a in ("kd-a1", "kd-a4", "ted-a1", "ted-a4"))))
    out = {"TED main effect (mean over α)": interval([((t1 - k1) + (t4 - k4)) / 2 for k1, k4, t1, t4 in rows]),
           "TED − KD at α = 1": interval([t1 - k1 for k1, k4, t1, t4 in rows]),
           "TED − KD at α = 4": interval([t4 - k4 for k1, k4, t1, t4 in rows]),
           "α = 4 − α = 1 (mean over methods)": interval([((k4 - k1) + (t4 - t1)) / 2 for k1, k4, t1, t4 in rows]),
           "interaction (TED − KD at α = 4) − (at α = 1)": interval([(t4 - k4) - (t1 - k1) for k1, k4, t1, t4 in rows])}
    for arm in ("lwd-identity-a1", "ted-cosine-a1"):
        out[f"ted-a1 − {arm}"] = paired_comparison(get["ted-a1"], at(scores, arm, step, split))
    return out


# ----------------------------------------------------------------------------- report
def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_pm(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.4f} ± {s:.4f}"


def _interval_text(c: dict) -> str:
    return (f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}], p = {c['p']:.3f}, "
            f"{c['favourable']}/{c['n']} below 0, detectable ≥ {c['detectable']:.4f}")


def report(out: str, results: dict) -> None:
    size, m, scores = results["size"], results["machine"], results["scores"]
    steps, arms = size["eval_steps"], list(ARMS)
    tokens = size["student_steps"] * size["global"] * size["seq_len"]
    matched = results["matched"]
    lines = ["# TED vs KD, study v5 (small scale, CPU)", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} CPUs ({m.get('cpu', 'CPU not recorded')}), "
             f"{results['elapsed_s'] / 60:.0f} min; seeds {results['seeds']}; produced by `bench/repro.py` "
             f"({results['jobs']} runs at a time, {results['ranks']} rank(s) each). Minutes per phase: "
             + ", ".join(f"{name} {sec / 60:.0f}" for name, sec in results["phases_s"].items()) + ".", "",
             f"Teacher: LLaMA-style, {size['teacher_layers']} layers, d={size['hidden']}, {size['teacher_steps']} "
             f"steps on Wikipedia (valid loss {results['teacher']['wikipedia']:.4f}, books "
             f"{results['teacher']['books']:.4f} nats/token). Student: {size['student_layers']} layers, "
             f"d={size['hidden']}, from teacher blocks {[b + 1 for b in aligned_blocks(size)]} (1-based), "
             f"{size['student_steps']} steps ({tokens:,} tokens), same data order per seed; T = 2; stage 1: "
             f"{size['filter_steps']} steps per bank, learned again per seed (teacher's frozen head). "
             f"{MATCHED}: {matched['steps']} steps (TED α = 1 with its stage 1 ÷ KD's seconds per step, median "
             f"over seeds; per seed " + ", ".join(f"{r['steps']:.0f}" for r in matched["per_seed"]) + ").", "",
             "## Decision rule (pre-registered) and its outcome", "",
             f"Books test loss at step {size['student_steps']}. TED is worth it here only if the TED main effect "
             "at matched α, ½[(ted-a1 − kd-a1) + (ted-a4 − kd-a4)], has a 95 % paired t interval below 0 and "
             f"ted-a1 − {MATCHED} (at its last step) too.", "",
             f"* main effect: {_interval_text(results['decision']['main_effect'])} nats/token",
             f"* ted-a1 − {MATCHED}: {_interval_text(results['decision']['vs_compute_matched'])} nats/token",
             f"* **outcome: {results['decision']['outcome']}**", "",
             "## Loss in nats per token (mean ± std over seeds)", "",
             "| arm | " + " | ".join(f"{s} @ {k}" for s in SPLITS for k in steps) + " | last step |",
             "|---|" + "---|" * (len(SPLITS) * len(steps) + 1)]
    for arm in arms:
        cells = []
        for split in SPLITS:
            for k in steps:
                have = all(k in by for by in scores[arm])
                cells.append(mean_pm(at(scores, arm, k, split)) if have else "—")
        last = max(scores[arm][0])
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {last} |")
    lines += ["", f"{MATCHED} at its last step: books " + mean_pm(final(scores, MATCHED)) +
              ", wikipedia " + mean_pm(final(scores, MATCHED, "wikipedia")) + ".", "",
              "## Paired differences (nats per token; 95 % t interval; negative favours the first)", ""]
    for split in SPLITS:
        for k in steps:
            lines += [f"### {split} @ step {k}", ""]
            lines += [f"* {name}: {_interval_text(c)}" for name, c in effects(scores, k, split).items()]
            lines.append("")
    lines += ["## Stage 1: next-token loss of the filtered states per tap (mean of the last 5 steps)", "",
              "| seed | bank | taps |", "|---|---|---|"]
    for seed, by_bank in results["stage1"].items():
        for name, taps in by_bank.items():
            lines.append(f"| {seed} | {name} | " + ", ".join(f"{t}: {v:.3f}" for t, v in taps.items()) + " |")
    lines += ["", "![curves](curves.png)"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out, results)
    print("\n".join(lines))


def plot(out: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for arm, curves in results["curves"].items():
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        window = max(1, len(steps) // 10)  # a moving average: per-batch losses are noisy
        axes[0].plot(steps, [statistics.mean(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))],
                     label=arm)
        by_step = results["scores"][arm]
        evaluated = sorted(by_step[0])
        axes[1].plot(evaluated, [statistics.mean(s[k]["books"] for s in by_step) for k in evaluated], "o-", label=arm)
    axes[0].set(xlabel="step", ylabel="train LM loss (mean of seeds, moving average)", title="training")
    axes[1].set(xlabel="step", ylabel="books test loss, nats/token (mean of seeds)", title="test split")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)


# ----------------------------------------------------------------------------- the study
def collect(work: str, seeds: list[int]) -> dict:
    """Per arm and seed, the in-run evaluations (JSON keys are strings: steps become ints again) and curves."""
    scores = {arm: [evaluations(arm_dir(work, s, arm)) for s in seeds] for arm in ARMS}
    curves = {arm: [train_curve(arm_dir(work, s, arm)) for s in seeds] for arm in ARMS}
    stage1 = {str(s): {w: stage1_taps(bank(work, s, w) + "-run") for w in ("teacher", "student")} for s in seeds}
    teacher = evaluations(f"{work}/teacher")
    return {"scores": scores, "curves": curves, "stage1": stage1, "teacher": teacher[max(teacher)]}


def with_int_steps(results: dict) -> dict:
    results["scores"] = {arm: [{int(k): v for k, v in by.items()} for by in runs]
                         for arm, runs in results["scores"].items()}
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and budget: checks the pipeline only")
    ap.add_argument("--seeds", type=int, help="paired seeds (default 5, quick 2)")
    ap.add_argument("--ranks", type=int, default=1, help="processes per training command (default 1)")
    ap.add_argument("--jobs", type=int, default=2, help="training commands at once (default 2: one per core)")
    ap.add_argument("--out", help="results directory (default bench/results/repro[-quick])")
    ap.add_argument("--corpus", help="training corpus, one document per line (default: ../shared/data/"
                                     "enwiki_sample.txt if present, else the bundled sample)")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md and the plot from results.json")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 5))))
    if len(seeds) < 2:
        ap.error("--seeds must be ≥ 2 (the comparisons are paired intervals)")
    out = os.path.abspath(args.out or os.path.join(REPO, "bench", "results", "repro-quick" if args.quick else "repro"))
    if args.report_only:
        results = with_int_steps(json.load(open(os.path.join(out, "results.json"))))
        report(out, results)
        return results
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    start, phases = time.time(), {}

    def phase(name: str, fn, *a):
        t = time.time()
        print(f"repro: {name} …", flush=True)
        result = fn(*a)
        phases[name] = round(time.time() - t)
        return result

    data = phase("data", prepare_data, work, size, args.corpus)
    launch = Launcher(write_run_config(work, data, size), args.ranks, args.jobs)
    phase("teacher", launch.one, *teacher_run(work, data["tokenizer"], size))
    phase("stage 1", launch.many, [stage1_run(work, size, s, w) for s in seeds for w in ("teacher", "student")])
    phase("arms", launch.many, [arm_run(work, size, s, a, size["student_steps"]) for s in seeds for a in ARMS
                                if a != MATCHED])
    matched = matched_steps(work, size, seeds)
    phase("compute-matched KD", launch.many, [arm_run(work, size, s, MATCHED, matched["steps"]) for s in seeds])
    results = {"machine": machine(), "size": size, "seeds": seeds, "ranks": args.ranks, "jobs": args.jobs,
               "arms": {a: list(o) for a, o in ARMS.items()}, "matched": matched, **collect(work, seeds)}
    results["decision"] = decide(results["scores"])
    results["phases_s"], results["elapsed_s"] = phases, time.time() - start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(out, with_int_steps(json.load(open(os.path.join(out, "results.json")))))
    print(f"repro: {results['elapsed_s'] / 60:.1f} min; results in {out}")
    return results


if __name__ == "__main__":
    main()
