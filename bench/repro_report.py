"""The TED study's report: results.md (the rule's outcome, the per-step table, every paired effect, the
stage-1 losses) and curves.png, from results.json."""

from __future__ import annotations

import os
import statistics

from bench.repro_study import ARMS, MATCHED, SPLITS, aligned_blocks, at, effects, final


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


def with_int_steps(results: dict) -> dict:
    results["scores"] = {arm: [{int(k): v for k, v in by.items()} for by in runs]
                         for arm, runs in results["scores"].items()}
    return results
