"""Worker of bench/engine_bench.py: times one configuration on every rank of a launch.

    deepspeed --num_gpus N bench/mp_engine_bench.py --config run.yaml --out result.json [key=value ...]

Measures, per rank (medians over the timed steps): a full training step of ``distill.method`` (the
trainer's own ``setup``, ``build_recipe`` and ``train_step``), the teacher's forward alone on the same
micro-batches, peak RSS, and (pipeline) the stages' busy time inside teacher calls. With ``--with-lm``
the same process also builds the student-only LM baseline (same initialisation) and times its step on
the same micro-batches, interleaved with the others, so that the overhead ratio is not at the mercy of
run-to-run noise between launches.  Every timed job ends with ``distributed.synchronize``: on a GPU a
timer that stops before the device is done times the kernel launches, not the work.  Also reported:
the step's FLOPs per token as the trainer counts them for MFU, and (GPU) the peak memory allocated
during the timed steps.
"""

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: bench.*

from bench.profile_bench import profile_steps  # noqa: E402
from ted_ds import distributed  # noqa: E402
from ted_ds.cli import _quiet_libraries  # noqa: E402
from ted_ds.config import load_run_config  # noqa: E402
from ted_ds.plan import Job, plan  # noqa: E402
from ted_ds.recipes import build_recipe  # noqa: E402
from ted_ds.run import setup  # noqa: E402
from ted_ds.trainer import train_step, training_data  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_jobs(jobs: dict, data, warmup: int, steps: int, on_gpu: bool) -> dict[str, list[float]]:
    """Seconds of each job on the same micro-batches, rotated so that no job always runs first; the GPU's
    peak memory is counted from the first timed step (optimizer states exist by then)."""
    names = list(jobs)
    times = {name: [] for name in names}
    for i in range(warmup + steps):
        micro = data.next_batch()
        if i == warmup and on_gpu:
            torch.cuda.reset_peak_memory_stats()
        for name in names[i % len(names):] + names[:i % len(names)]:
            distributed.barrier()
            start = time.perf_counter()
            jobs[name](micro)
            distributed.synchronize()  # the device's work done, not just queued (barrier: only ranks wait)
            distributed.barrier()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--with-lm", action="store_true", help="also time the student-only LM step (same process)")
    ap.add_argument("--series", action="store_true", help="also report every timed step's seconds, by job")
    ap.add_argument("--profile-steps", type=int, default=0, help="then profile this many steps (bench/profile_bench)")
    ap.add_argument("--local_rank", type=int)
    args, overrides = ap.parse_known_args()
    _quiet_libraries()
    cfg = load_run_config(args.config, overrides)
    p, ds = setup(cfg)
    rss_before = rss_mb()
    recipe = build_recipe(p, ds, Job.DISTILL)
    rss_built = rss_mb()
    baseline = None
    if args.with_lm:
        lm_cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, method="lm"),
                                     teacher=dataclasses.replace(cfg.teacher, cache=None))  # LM reads no teacher
        baseline = build_recipe(plan(lm_cfg), ds, Job.DISTILL)
    data = training_data(p)
    jobs = {"step": lambda micro: train_step(recipe, micro)}
    if recipe.frozen is not None:
        jobs["teacher"] = lambda micro: [recipe.frozen(b.input_ids) for b in micro]
    if baseline is not None:
        jobs["lm"] = lambda micro: train_step(baseline, micro)
    if hasattr(recipe.frozen, "timed"):
        recipe.frozen.timed = True  # the pipeline's bubble timers wait for the device
    on_gpu = distributed.device().type == "cuda"
    times = timed_jobs(jobs, data, args.warmup, args.steps, on_gpu)
    stats = getattr(recipe.frozen, "stats", None)
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0
    mine = {"rank": distributed.rank(), "step_s": median(times["step"]),
            "teacher_forward_s": median(times.get("teacher", [])),
            "lm_step_s": median(times["lm"]) if "lm" in times else None,
            "peak_rss_mb": rss_mb(),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
            "flops_per_token": recipe.flops_per_token,
            "rss_before_build_mb": rss_before, "rss_after_build_mb": rss_built,
            "teacher_local_params": recipe.frozen.local_parameters() if recipe.frozen is not None else 0,
            "bubble": 1 - stats["busy_s"] / stats["wall_s"] if stats else None,
            "tokens_per_step": cfg.tokens_per_step}
    if args.series:
        mine["series"] = times
    if args.profile_steps:
        mine["profile"] = profile_steps(jobs["step"], [data.next_batch() for _ in range(args.profile_steps)],
                                        distributed.device().type != "cpu")
    gathered = [None] * distributed.world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if distributed.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    distributed.shutdown()
    distributed.leave(0)


if __name__ == "__main__":
    main()
