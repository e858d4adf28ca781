"""TED step overhead and teacher placements, measured in one run.

    python bench/engine_bench.py [--quick]
    python bench/engine_bench.py --kd-cache [--quick]

* Overhead: on 2 ranks, the TED step time ÷ (student-only LM step + teacher forward on the same
  micro-batches), all three timed in one launch, interleaved step by step (medians). Goal ≤ 1.10: TED
  adds only filters and two losses to what distillation must do anyway.
* Levers (``--levers``): the same 2-rank TED step with each speed switch alone (compiled blocks,
  every parameter persistent, eager attention), time ÷ the configured step of the same launch
  series.  On a CPU this says what they cost or buy here, nothing about a GPU (make gpu-check).
* KD from the cache (``--kd-cache``): on 2 ranks, the demo's shapes (teacher 4 × d=128, vocab 4k, student of
  its blocks 1 and 3, seq 128, micro-batch 8, one micro-batch per rank per step), KD from a top-64 fp16
  cache ÷ the student-only LM step of the same launch, both series step by step (medians). Goal ≤ 1.05:
  reading the teacher from a cache should cost about what a plain LM step does.
* Placements: replicated / zero3 / pipeline teacher at 2 and 4 ranks: step time, peak RSS per rank,
  teacher parameters held per rank, and the pipeline bubble (share of a teacher call a stage is not
  computing). Goals: pipeline teacher memory per rank ≤ 0.6× replicated at P=2; step time ≤ 1.5×.

Models: a random LLaMA teacher (8 layers, d=256, vocab 8k) and a 4-layer student from teacher layers
0, 2, 4, 6; seq 128, micro-batch 4, 2 micro-batches per rank per step. 4 ranks on a 2-core machine are
oversubscribed: read those times as a memory/correctness check, not as speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, machine, persistent_config, run, tiny_world  # noqa: E402
from ted_ds.config import apply_override  # noqa: E402
from ted_ds.launch import local_deepspeed_command as deepspeed  # noqa: E402


def _plain_config(world: dict, out: str, **over) -> dict:
    """A run of the world's data and teacher, no filters (``distill.method`` and the rest from ``over``)."""
    cfg = {
        "teacher": {"path": world["teacher"], "placement": "replicated"},
        "student": {"init_from_teacher": [0, 2, 4, 6]},
        "data": {"path": world["data"], "seq_len": 128},
        "distill": {"method": "kd"},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"out_dir": out, "micro_batch_size": 4, "global_batch_size": 8, "steps": 100,
                  "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json"), "progress": False},
    }
    for key, value in over.items():
        apply_override(cfg, f"{key}={yaml.safe_dump(value)}")  # the value as YAML, which it parses back
    return cfg


def _config(world: dict, out: str, ranks: int, **over) -> dict:
    """The TED run of the overhead and placement rows (the world's filter banks), ``over`` applied."""
    ted = {"teacher.filters": world["banks"]["teacher"], "student.filters": world["banks"]["student"],
           "distill.method": "ted", "distill.teacher_every": 2, "distill.student_every": 1,
           "train.global_batch_size": 8 * ranks}
    return _plain_config(world, out, **{**ted, **over})


def measure(world: dict, workdir: str, name: str, ranks: int, steps: int, *flags: str, plain: bool = False,
            **over) -> list[dict]:
    path = os.path.join(workdir, f"{name}.yaml")
    config = _plain_config(world, os.path.join(workdir, name), **over) if plain else \
        _config(world, os.path.join(workdir, name), ranks, **over)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    out = os.path.join(workdir, f"{name}.json")
    run(deepspeed(ranks, os.path.join(REPO, "bench", "mp_engine_bench.py"), "--config", path, "--out", out,
                  "--steps", str(steps), *flags), env={"DS_ACCELERATOR": "cpu"})
    return json.load(open(out))


def summarize(ranks: list[dict]) -> dict:
    mean = lambda k: sum(r[k] for r in ranks) / len(ranks)
    bubbles = [r["bubble"] for r in ranks if r["bubble"] is not None]
    return {"step_s": max(r["step_s"] for r in ranks), "teacher_forward_s": max(r["teacher_forward_s"] for r in ranks),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ranks), "peak_rss_mb_mean": mean("peak_rss_mb"),
            "teacher_params_per_rank_max": max(r["teacher_local_params"] for r in ranks),
            "bubble": sum(bubbles) / len(bubbles) if bubbles else None,
            "tokens_per_s": ranks[0]["tokens_per_step"] / max(r["step_s"] for r in ranks)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps, 2 ranks only")
    ap.add_argument("--levers", action="store_true", help="only the speed switches against the configured step")
    ap.add_argument("--kd-cache", action="store_true", help="only KD from a top-64 cache against the LM step")
    ap.add_argument("--out", default="kd_cache.json", help="--kd-cache's result, under bench/results/")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ted-ds-bench"))
    args = ap.parse_args(argv)
    steps = 2 if args.quick else 10
    if args.kd_cache:
        return kd_from_cache(os.path.join(args.workdir, "kd-cache"), 6 * steps, args.out)
    world = tiny_world(args.workdir)
    if args.levers:
        return levers(world, args.workdir, 2 * steps)
    results = {"machine": machine(), "overhead": {}, "placements": {}}

    # the three timings interleaved in one process (TED, student-only LM, teacher forward), same batches
    both = measure(world, args.workdir, "overhead-2", 2, 2 * steps, "--with-lm")
    slowest = lambda key: max(r[key] for r in both)
    results["overhead"] = {"lm_step_s": slowest("lm_step_s"), "teacher_forward_s": slowest("teacher_forward_s"),
                           "ted_step_s": slowest("step_s")}
    o = results["overhead"]
    o["ratio"] = o["ted_step_s"] / (o["lm_step_s"] + o["teacher_forward_s"])
    for ranks in ((2,) if args.quick else (2, 4)):
        for placement in ("replicated", "zero3", "pipeline"):
            key = f"{placement}@{ranks}"
            over = {"teacher.placement": placement, "teacher.pipeline_stages": 2}
            results["placements"][key] = summarize(measure(world, args.workdir, f"ted-{placement}-{ranks}", ranks,
                                                           steps, **over))
    report(results)
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "engine.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def levers(world: dict, workdir: str, steps: int) -> dict:
    """The TED step on 2 ranks as configured and with each speed switch alone, then as configured again
    (launch-to-launch noise); bench/results/levers.json."""
    persistent = persistent_config(os.path.join(REPO, "ds_configs", "zero3_cpu.json"), workdir)
    switches = {"configured": {}, "compile_blocks": {"train.compile_blocks": True},
                "persistent_params": {"train.deepspeed_config": persistent},
                "eager_attention": {"student.attn_implementation": "eager", "teacher.attn_implementation": "eager"},
                "configured_again": {}}  # the noise between launches: ratios nearer 1 than this one mean nothing
    rows = {name: summarize(measure(world, workdir, f"lever-{name}", 2, steps, **over))["step_s"]
            for name, over in switches.items()}
    results = {"machine": machine(), "steps": steps, "step_s": rows,
               "ratio": {name: s / rows["configured"] for name, s in rows.items()}}
    for name, ratio in results["ratio"].items():
        print(f"{name:<20}{rows[name]:>8.3f} s   {ratio:.3f}x the configured step")
    with open(os.path.join(REPO, "bench", "results", "levers.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def kd_from_cache(workdir: str, steps: int, out: str) -> dict:
    """KD from a top-64 cache and the plain LM step of the same student, timed in one 2-rank launch on the
    demo's shapes (its teacher trained briefly, so that its top-k compresses as a real one's) on the cache
    bench's slice of the corpus (1,000 paragraphs: the cache is built in a minute, the sampler wraps around it);
    bench/results/<out> with every step's seconds of both series."""
    from bench.cache_bench import small_data, trained_teacher

    world = tiny_world(workdir, vocab=4000, teacher_layers=4, hidden=128)
    here = os.path.dirname(world["teacher"])  # the world's own directory: its teacher, data slice and cache
    teacher = trained_teacher(world, here, 100)
    over = {"teacher.path": teacher, "data.path": small_data(world, here, 1000), "teacher.logits_topk": 64,
            "teacher.logits_dtype": "fp16",
            "student.init_from_teacher": [1, 3], "distill.method": "kd", "distill.temperature": 2.0,
            "train.micro_batch_size": 8, "train.global_batch_size": 16}
    cache = os.path.join(here, "cache-k64")
    if not os.path.isfile(os.path.join(cache, "manifest.json")):
        path = os.path.join(workdir, "for-cache.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(_plain_config(world, os.path.join(workdir, "for-cache"), **over), f)
        run(deepspeed(1, "--module", "ted_ds", "cache-teacher", "--config", path, "--out", cache),
            env={"DS_ACCELERATOR": "cpu"})
    ranks = measure(world, workdir, "kd-cache", 2, steps, "--with-lm", "--series", plain=True,
                    **over, **{"teacher.cache": cache})
    slowest = lambda key: max(r[key] for r in ranks)
    results = {"machine": machine(), "steps": steps, "kd_step_s": slowest("step_s"), "lm_step_s": slowest("lm_step_s"),
               "ranks": ranks}
    results["ratio"] = results["kd_step_s"] / results["lm_step_s"]
    print(f"KD from a top-64 cache (2 ranks, {steps} steps): {results['kd_step_s']:.4f} s / LM step "
          f"{results['lm_step_s']:.4f} s = {results['ratio']:.3f}x   goal <= 1.05")
    with open(os.path.join(REPO, "bench", "results", out), "w") as f:
        json.dump(results, f, indent=1)
    return results


def report(r: dict) -> None:
    o = r["overhead"]
    print(f"TED step overhead (2 ranks): ted {o['ted_step_s']:.3f} s / (lm {o['lm_step_s']:.3f} s + teacher forward "
          f"{o['teacher_forward_s']:.3f} s) = {o['ratio']:.3f}   goal <= 1.10")
    print(f"{'placement':<16}{'step s':>9}{'tok/s':>9}{'peak RSS MB':>13}{'teacher params/rank':>21}{'bubble':>8}")
    for key, v in r["placements"].items():
        bubble = f"{v['bubble']:.2f}" if v["bubble"] is not None else "-"
        print(f"{key:<16}{v['step_s']:>9.3f}{v['tokens_per_s']:>9.0f}{v['peak_rss_mb_max']:>13.0f}"
              f"{v['teacher_params_per_rank_max']:>21,.0f}{bubble:>8}")
    p = r["placements"]
    for ranks in (2, 4):
        if f"pipeline@{ranks}" in p:
            rep, pipe = p[f"replicated@{ranks}"], p[f"pipeline@{ranks}"]
            print(f"pipeline vs replicated @{ranks}: teacher memory/rank "
                  f"{pipe['teacher_params_per_rank_max'] / rep['teacher_params_per_rank_max']:.2f}x (goal <= 0.6 at "
                  f"P=2), step time {pipe['step_s'] / rep['step_s']:.2f}x (goal <= 1.5), peak RSS "
                  f"{pipe['peak_rss_mb_max'] / rep['peak_rss_mb_max']:.2f}x")


if __name__ == "__main__":
    main()
