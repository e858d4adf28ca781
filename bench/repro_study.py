"""The TED study's design and its pre-registered rule (bench/repro.py's docstring states them in words):
the model sizes, the arms, the paired statistics and the decision."""

from __future__ import annotations

import math
import statistics

SPLITS = ("books", "wikipedia")  # the blend's sources: books (weight 0) is the test split

FULL = {"vocab": 4096, "teacher_layers": 6, "hidden": 192, "heads": 4, "seq_len": 128, "micro": 8, "global": 16,
        "teacher_steps": 600, "filter_steps": 40, "student_steps": 200, "eval_steps": (40, 100, 200),
        "student_layers": 3, "corpus_lines": None, "eval_samples": 1024}
QUICK = {"vocab": 1000, "teacher_layers": 4, "hidden": 64, "heads": 4, "seq_len": 32, "micro": 2, "global": 8,
         "teacher_steps": 20, "filter_steps": 3, "student_steps": 6, "eval_steps": (2, 4, 6), "student_layers": 2,
         "corpus_lines": 1500, "eval_samples": 32}


def aligned_blocks(size: dict) -> list[int]:
    """0-based teacher blocks whose outputs student blocks 1..n are matched to: k-1, 2k-1, … (k = interval)."""
    k = size["teacher_layers"] // size["student_layers"]
    return [k * (i + 1) - 1 for i in range(size["student_layers"])]


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
