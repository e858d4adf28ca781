"""TED study v6: where TED should matter — a domain-adapted teacher, a student with a real capacity gap,
the new domain as the task — and a replication of v5's exploratory finding (``bench/repro.py --study v6``).

This design, its sizes and its decision rule were committed before any of its runs (git log of this file).
v5 (``bench/results/repro``) is kept as it was; v6 reuses its harness (bench/repro_runs.py).

**Shared.** The v5 tokenizer (4k BPE on the Wikipedia sample) and the v5 teacher: LLaMA-style, 6 layers,
d = 192, pre-trained 600 steps with ``method: lm`` on Wikipedia.

**Cell B — the continual pre-training regime (runs first; it decides the recommendation).**
1. Data: the books corpus (``../shared/data/pd-books-spurgeon-web.txt.gz``, first 12,000 paragraphs; the
   bundled books sample without ../shared) split by document (one paragraph = one document, by a hash of
   its text): 80 % train, 10 % valid (tuning), 10 % test. Training reads books-train blended 3 : 1 with
   Wikipedia replay (the demo's continual step); books-valid and books-test are evaluated in-run on every
   window of 90 % of their documents (as v5 evaluates books: the rest is their builds' unused train split),
   Wikipedia valid on every window of v5's valid split (``data.eval_samples`` above the window counts).
2. The teacher adapted to books: the v5 teacher, continual LM 300 steps on that blend (lr 1e-3 → 1e-4).
3. The student: LLaMA-style, 3 layers, d = 128 (0.58 M non-embedding parameters, 22 % of the teacher's
   2.65 M; narrower and shallower), **pre-trained on Wikipedia** 600 steps with ``method: lm`` (as the
   teacher) — the common real case: a small model of the family exists and is continually pre-trained on
   the new domain, here from a bigger teacher already adapted to it. Taps: teacher layers 2, 4, 6 ↔
   student layers 1, 2, 3; TED's student filters map d = 128 into the teacher's 192.
4. Stage 1 on the blend (books + replay), 150 steps per bank (lr 1e-2, 15 warm-up steps; v5: 40 with 20
   warm-up), learned again per seed; its convergence reported as each tap loss's change over the last 20 %
   of its steps.
5. Tuning on **books-valid** at step 200 with tuning seed 0 (its own stage 1), the same budget of four runs
   per method, grids fixed here: KD α ∈ {4, 16} × T ∈ {1, 2} (the official kl_alpha range is 5–20); then
   TED-cosine α ∈ {4, 16} × β ∈ {1, 10} at KD's tuned T (the KD term is the same term in both methods).
   Ties go to the first in grid order. ``ted`` (normalized MSE) and ``lwd-identity-cosine`` take
   TED-cosine's tuned α, β (secondary arms, not tuned); ``lm`` has nothing to tune.
6. Arms, 200 steps each, seeds 1–4 (same data order per seed across arms): ``lm`` (no teacher), ``kd``,
   ``ted-cosine`` (TED, cosine layer loss), ``ted`` (TED, normalized MSE), ``lwd-identity-cosine`` (raw
   teacher states, an identity-initialised student map (zero-padded 128 → 192), cosine loss: TED without
   the filters), and ``kd-matched``: KD at its tuned settings for as many steps as ted-cosine costs with
   both stage-1 banks (measured training seconds ÷ KD's seconds per step, median over seeds). Evaluated at
   steps 100 and 200 (the matched arm also at its last step).

**Cell A — replication of v5's exploratory finding, v5's setting unchanged** (student = teacher blocks
2, 4, 6 at d = 192, stage 1 40 steps per bank on Wikipedia, 200 steps, books = the bundled sample as test),
arms ``kd``, ``ted-cosine`` and ``lwd-identity-cosine`` (LWD with the identity map and the cosine loss), all
at **α = 4, β = 1, T = 2**: α = 4 because it beat α = 1 for both methods in v5 — the finding (ted-cosine
beat KD at α = 1, not KD at α = 4) only matters if it holds against KD's better α. Seeds 1–5.

**Decision rule** (pre-registered). Metric: books **test** loss in nats/token at each arm's last step.
Intervals are paired t intervals over seeds at 97.5 % (Bonferroni over the two hypotheses).
* H_A (cell A): ted-cosine − kd has its upper bound below 0.
* H_B (cell B): ted-cosine − kd **and** ted-cosine − kd-matched both have upper bounds below 0.
* Outcome: H_B holds → "TED is worth it for domain-adaptive continual pre-training with a capacity gap";
  otherwise "not shown for continual pre-training: KD is the default". H_A holds → "the v5 finding
  replicates at α = 4"; otherwise "the v5 finding does not replicate against KD at α = 4".
  A cell whose runs did not all finish is reported as not run, never ruled on from a part.
* Secondary, not ruled on: ted-cosine − lwd-identity-cosine per cell ("the filters add nothing" if its
  90 % interval lies within ±0.003); kd − lm (does the teacher help at all); ted − ted-cosine; Wikipedia
  valid (forgetting); how far the learned filters are from identity (singular values: effective rank,
  σ_min/σ_max, and for square filters ‖W − I‖_F / ‖I‖_F).
* Expected effects and power, from v5's paired spread (sd of ted-cosine − kd over seeds: 0.0013 at α = 1,
  0.0072 against KD at α = 4; v5's effects were ≤ 0.01 nats): with that spread, cell A (5 seeds,
  t₀.₉₈₇₅,₄ = 3.50) detects a true difference of about (3.50 + 0.94) · 0.0072 / √5 ≈ 0.014 nats at 80 %
  power, cell B (4 seeds, t₀.₉₈₇₅,₃ = 4.18) about (4.18 + 0.98) · 0.0072 / 2 ≈ 0.019; a spread like the
  α = 1 pair (0.0013) would detect ≈ 0.003. We expect |TED − KD| ≤ 0.02 nats in cell B: a null outcome
  there means "no effect larger than about 0.02 nats", not "no effect".

``--quick`` shrinks everything (tiny models, corpus slices, two seeds, a few steps) to check the pipeline.
"""

from __future__ import annotations

from bench.repro_runs import arm_dir, evaluations
from bench.repro_study import interval

TED_COSINE = ("distill.method=ted", "distill.layer_loss=cosine")
LWD_COSINE = ("distill.method=lwd", "distill.layer_loss=cosine", "distill.lwd_map_init=identity")

# ----------------------------------------------------------------------------- cell A: v5's setting
CELL_A = {"kd": ("distill.method=kd", "distill.alpha=4.0"),
          "ted-cosine": (*TED_COSINE, "distill.alpha=4.0", "distill.beta=1.0"),
          "lwd-identity-cosine": (*LWD_COSINE, "distill.alpha=4.0", "distill.beta=1.0")}

# ----------------------------------------------------------------------------- cell B: continual pre-training
B_FULL = {"books_lines": 12000, "student_layers": 3, "student_hidden": 128, "student_base_steps": 600,
          "adapt_steps": 300, "filter_steps": 150, "filter_warmup": 15, "student_steps": 200,
          "eval_steps": (100, 200), "seeds": (1, 2, 3, 4), "books_weight": 3.0, "eval_samples": 4096}
B_QUICK = {"books_lines": 600, "student_layers": 2, "student_hidden": 32, "student_base_steps": 10,
           "adapt_steps": 6, "filter_steps": 5, "filter_warmup": 1, "student_steps": 6,
           "eval_steps": (3, 6), "seeds": (1, 2), "books_weight": 3.0, "eval_samples": 64}
B_SPLITS = ("books-test", "books-valid", "wikipedia")
TUNING_SEED = 0
KD_GRID = [{"alpha": a, "temperature": t} for a in (4.0, 16.0) for t in (1.0, 2.0)]
TED_GRID = [{"alpha": a, "beta": b} for a in (4.0, 16.0) for b in (1.0, 10.0)]
B_ARMS = ("lm", "kd", "ted-cosine", "ted", "lwd-identity-cosine")
B_MATCHED = "kd-matched"


def b_arms(kd: dict, ted: dict) -> dict[str, tuple]:
    """Cell B's arms at the tuned settings: ``kd`` {alpha, temperature}, ``ted`` {alpha, beta}."""
    t = f"distill.temperature={kd['temperature']}"
    ted_w = (f"distill.alpha={ted['alpha']}", f"distill.beta={ted['beta']}", t)
    kd_arm = ("distill.method=kd", f"distill.alpha={kd['alpha']}", t)
    return {"lm": ("distill.method=lm",), "kd": kd_arm, "ted-cosine": (*TED_COSINE, *ted_w),
            "ted": ("distill.method=ted", "distill.layer_loss=normalized_mse", *ted_w),
            "lwd-identity-cosine": (*LWD_COSINE, *ted_w), B_MATCHED: kd_arm}


def tuned(work: str, grid: list[dict], name: str) -> dict:
    """The grid point with the lowest books-valid loss at the tuning run's last step (ties: grid order)."""
    losses = [final_loss(arm_dir(work, TUNING_SEED, f"{name}-{i}"), "books-valid") for i in range(len(grid))]
    return {**grid[losses.index(min(losses))], "losses": losses}


def final_loss(out_dir: str, split: str) -> float:
    by_step = evaluations(out_dir, B_SPLITS)
    return by_step[max(by_step)][split]


# ----------------------------------------------------------------------------- the rule
def decide_v6(cells: dict) -> dict:
    """The pre-registered rule (module docstring) on per-seed books-test losses at each arm's last step."""
    out = {}
    if "A" in cells:
        a = cells["A"]
        h_a = interval([t - k for t, k in zip(a["ted-cosine"], a["kd"])], confidence=0.975)
        out["H_A"] = {"ted-cosine − kd": h_a, "holds": bool(h_a["high"] < 0),
                      "outcome": "the v5 finding replicates at α = 4" if h_a["high"] < 0
                      else "the v5 finding does not replicate against KD at α = 4"}
    else:
        out["H_A"] = {"outcome": "cell A not run", "holds": None}
    if "B" in cells:
        b = cells["B"]
        kd = interval([t - k for t, k in zip(b["ted-cosine"], b["kd"])], confidence=0.975)
        matched = interval([t - k for t, k in zip(b["ted-cosine"], b[B_MATCHED])], confidence=0.975)
        holds = bool(kd["high"] < 0 and matched["high"] < 0)
        out["H_B"] = {"ted-cosine − kd": kd, f"ted-cosine − {B_MATCHED}": matched, "holds": holds,
                      "outcome": "TED is worth it for domain-adaptive continual pre-training with a capacity gap"
                      if holds else "not shown for continual pre-training: KD is the default"}
    else:
        out["H_B"] = {"outcome": "cell B not run", "holds": None}
    return out


def filters_add_nothing(ted: list[float], lwd: list[float], margin: float = 0.003) -> dict:
    """Secondary: the 90 % interval of ted-cosine − lwd-identity-cosine, and whether it lies within ±margin."""
    c = interval([t - w for t, w in zip(ted, lwd)], confidence=0.90)
    return {**c, "within_margin": bool(-margin < c["low"] and c["high"] < margin)}
