"""Worker of bench/engine_bench.py: times one configuration on every rank of a launch.

    deepspeed --num_gpus N bench/mp_engine_bench.py --config run.yaml --out result.json [key=value ...]

Measures, per rank (medians over the timed steps): a full training step of ``distill.method``, the
teacher's forward alone on the same micro-batches, peak RSS, and (pipeline) the stages' busy time
inside teacher calls.
"""

import argparse
import json
import resource
import time

import torch

from ted_ds import distributed as D
from ted_ds.cli import _quiet_libraries
from ted_ds.config import load_config
from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset, collate
from ted_ds.engine import resolve_ds_config
from ted_ds.stages import build_distill, plan
from ted_ds.trainer import seed_everything


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--local_rank", type=int)
    args, overrides = ap.parse_known_args()
    _quiet_libraries()
    cfg = load_config(args.config, overrides)
    p = plan(cfg)
    ds = resolve_ds_config(cfg, D.expected_world_size())
    D.init(cfg.train.timeout_minutes)
    seed_everything(cfg.train.seed)
    rss_before = rss_mb()
    stage = build_distill(p, ds)
    rss_built = rss_mb()
    data = PackedShardDataset(cfg.data.path, "train", cfg.data.seq_len)
    sampler = ConsumedSamplesSampler(len(data), cfg.train.global_batch_size, cfg.train.micro_batch_size, D.rank(),
                                     D.world_size(), cfg.train.seed)
    step_times, teacher_times = [], []
    for i in range(args.warmup + args.steps):
        micro = [collate(data, idx) for idx in sampler.next_batch()]
        D.barrier()
        start = time.perf_counter()
        for x, y in micro:
            terms = stage.loss(x, y)
            stage.engine.backward(terms["loss"])
            stage.engine.step()
        D.barrier()
        step = time.perf_counter() - start
        if stage.frozen is not None:
            start = time.perf_counter()
            for x, _ in micro:
                stage.frozen(x)
            D.barrier()
            teacher = time.perf_counter() - start
        else:
            teacher = 0.0
        if i >= args.warmup:
            step_times.append(step)
            teacher_times.append(teacher)
    stats = getattr(stage.frozen, "stats", None)
    median = lambda xs: sorted(xs)[len(xs) // 2]
    mine = {"rank": D.rank(), "step_s": median(step_times), "teacher_forward_s": median(teacher_times),
            "peak_rss_mb": rss_mb(),
            "rss_before_build_mb": rss_before, "rss_after_build_mb": rss_built,
            "teacher_local_params": stage.frozen.local_parameters() if stage.frozen is not None else 0,
            "bubble": 1 - stats["busy_s"] / stats["wall_s"] if stats else None,
            "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len}
    gathered = [None] * D.world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if D.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    D.shutdown()


if __name__ == "__main__":
    main()
