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
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, machine  # noqa: E402
from bench.repro_report import report, with_int_steps  # noqa: E402
from bench.repro_runs import (  # noqa: E402
    Launcher,
    arm_run,
    collect,
    matched_steps,
    prepare_data,
    stage1_run,
    teacher_run,
    write_run_config,
)
from bench.repro_study import ARMS, FULL, MATCHED, QUICK, decide  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=("v5", "v6"), default="v5",
                    help="v5 (this docstring) or v6 (domain-adaptive continual pre-training, bench/repro_v6.py)")
    ap.add_argument("--cells", default="BA", choices=("BA", "B", "A"), help="v6: which cells, in order (default BA)")
    ap.add_argument("--quick", action="store_true", help="tiny models and budget: checks the pipeline only")
    ap.add_argument("--seeds", type=int, help="paired seeds (default 5, quick 2)")
    ap.add_argument("--ranks", type=int, default=1, help="processes per training command (default 1)")
    ap.add_argument("--jobs", type=int, default=2, help="training commands at once (default 2: one per core)")
    ap.add_argument("--out", help="results directory (default bench/results/repro[-quick])")
    ap.add_argument("--corpus", help="training corpus, one document per line (default: ../shared/data/"
                                     "enwiki_sample.txt if present, else the bundled sample)")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md and the plot from results.json")
    args = ap.parse_args(argv)
    if args.study == "v6":
        return study_v6(args)
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


def study_v6(args) -> dict:
    """Study v6 (its design and rule: bench/repro_v6.py), into bench/results/repro-v6[-quick]."""
    from bench.repro_v6_report import report as report_v6
    from bench.repro_v6_runs import Study

    out = os.path.abspath(args.out or os.path.join(REPO, "bench", "results", "repro-v6-quick" if args.quick
                                                   else "repro-v6"))
    if args.report_only:
        results = json.load(open(os.path.join(out, "results.json")))
    else:
        results = Study(out, args.quick, args.ranks, args.jobs, args.corpus, args.cells).run()
        print(f"repro v6: {results['elapsed_s'] / 60:.1f} min; results in {out}")
    report_v6(out, results)
    return results


if __name__ == "__main__":
    main()
