"""Study v6's report: results.md (the rule's outcome in its own words, every arm's numbers, the paired
differences, stage-1 convergence, the filters' spectra) and curves.png, from results.json."""

from __future__ import annotations

import os
import statistics

from bench.repro_report import _interval_text, mean_pm
from bench.repro_study import interval
from bench.repro_v6 import B_MATCHED, filters_add_nothing

SECONDARY = {"B": [("ted-cosine", "lwd-identity-cosine"), ("kd", "lm"), ("ted", "ted-cosine"),
                   ("lwd-identity-cosine", "kd")],
             "A": [("ted-cosine", "lwd-identity-cosine"), ("lwd-identity-cosine", "kd")]}
TITLES = {"B": "Cell B — continual pre-training on books, domain-adapted teacher, capacity gap",
          "A": "Cell A — v5's setting, α = 4 (replication)"}


def report(out: str, results: dict) -> None:
    m, d = results["machine"], results["decision"]
    lines = ["# TED vs KD, study v6 (small scale, CPU)", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} CPUs ({m.get('cpu', '')}), "
             f"{results['elapsed_s'] / 60:.0f} min; produced by `bench/repro.py --study v6` ({results['jobs']} runs "
             "at a time). Minutes per phase: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in results["phases_s"].items())
             + ". The design and the rule: `bench/repro_v6.py`'s docstring, committed before any run.", "",
             "## Decision rule (pre-registered) and its outcome", "",
             "Books test loss at each arm's last step; 97.5 % paired t intervals (Bonferroni over H_A, H_B).", ""]
    for h in ("H_B", "H_A"):
        for name, c in ((k, v) for k, v in d[h].items() if isinstance(v, dict)):
            lines.append(f"* {h}: {name}: {_interval_text(c)} nats/token")
        lines.append(f"* **{h} outcome: {d[h]['outcome']}**")
    lines.append("")
    for cell in ("B", "A"):
        if cell in results["cells"]:
            lines += cell_section(cell, results["cells"][cell])
    lines += ["![curves](curves.png)"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out, results)
    print("\n".join(lines))


def cell_section(cell: str, c: dict) -> list[str]:
    scores, splits = c["scores"], sorted(next(iter(next(iter(c["scores"].values()))[0].values())))
    steps = sorted({k for runs in scores.values() for by in runs for k in by}, key=int)
    lines = [f"## {TITLES[cell]}", "", f"Seeds {c['seeds']}."]
    if "machine" in c:  # cells may run apart (--cells A after --cells B)
        lines[-1] += f" Run {c['machine']['date']}, commit {c['machine']['commit']}."
    if cell == "B":
        t = c["tuned"]
        lines += [f"Tuned on books-valid (seed 0): KD α = {t['kd']['alpha']:g}, T = {t['kd']['temperature']:g} "
                  f"(grid losses {[round(x, 4) for x in t['kd']['losses']]}); TED-cosine α = "
                  f"{t['ted-cosine']['alpha']:g}, β = {t['ted-cosine']['beta']:g} (grid losses "
                  f"{[round(x, 4) for x in t['ted-cosine']['losses']]}). {B_MATCHED}: {c['matched']['steps']} steps."]
    lines += ["", "| arm | " + " | ".join(f"{s} @ {k}" for s in splits for k in steps) + " |",
              "|---|" + "---|" * (len(splits) * len(steps))]
    for arm, runs in scores.items():
        cells = [mean_pm([by[k][s] for by in runs]) if all(k in by for by in runs) else "—"
                 for s in splits for k in steps]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    final = c["final_books"]
    lines += ["", "Paired differences on books test at the last step (95 % t interval; negative favours the "
              "first):", ""]
    for a, b in SECONDARY[cell]:
        lines.append(f"* {a} − {b}: {_interval_text(interval([x - y for x, y in zip(final[a], final[b])]))}")
    f = filters_add_nothing(final["ted-cosine"], final["lwd-identity-cosine"])
    lines += [f"* the filters add nothing (90 % interval of ted-cosine − lwd-identity-cosine within ±0.003): "
              f"{'yes' if f['within_margin'] else 'no'} ([{f['low']:+.4f}, {f['high']:+.4f}])", "",
              "Stage 1, per tap: loss in the first → last 10 % of steps (change over the last 20 %):", ""]
    for seed, banks in c["stage1"].items():
        for name, taps in banks.items():
            lines.append(f"* seed {seed} {name}: " + ", ".join(
                f"{t} {v['first']:.3f} → {v['last']:.3f} ({v['last_20pct_change']:+.3f})" for t, v in taps.items()))
    lines += ["", "Learned filters (mean over seeds, per tap): effective rank / min(in, out), σ_min/σ_max, "
              "‖W − I‖/‖I‖ where square:", ""]
    for name in ("teacher", "student"):
        rows = list(zip(*(c["filters"][s][name] for s in c["filters"])))
        lines.append(f"* {name}: " + "; ".join(spectrum_text(tap) for tap in rows))
    return lines + [""]


def spectrum_text(tap: tuple[dict, ...]) -> str:
    rank = statistics.mean(r["effective_rank"] / min(r["shape"]) for r in tap)
    ratio = statistics.mean(r["sigma_min_over_max"] for r in tap)
    text = f"{tap[0]['shape'][0]}×{tap[0]['shape'][1]} rank {rank:.2f}, σ ratio {ratio:.3f}"
    if "distance_to_identity" in tap[0]:
        text += f", ‖W − I‖/‖I‖ {statistics.mean(r['distance_to_identity'] for r in tap):.2f}"
    return text


def plot(out: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in ("B", "A") if c in results["cells"]]
    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for arm, curves in results["cells"][cell]["curves"].items():
            steps = [s for s, _ in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            window = max(1, len(steps) // 10)  # a moving average: per-batch losses are noisy
            ax.plot(steps, [statistics.mean(mean[max(0, i - window + 1): i + 1]) for i in range(len(mean))],
                    label=arm)
        ax.set(xlabel="step", ylabel="train LM loss (mean of seeds, moving average)", title=TITLES[cell][:40])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
