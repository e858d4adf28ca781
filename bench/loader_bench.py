"""Loader throughput vs what training consumes.

    python bench/loader_bench.py [--quick]

Times the engine's data path alone — ConsumedSamplesSampler + PackedShardDataset windows + collate,
one rank's share of 2 — and compares its tokens/s with the training throughput measured by
bench/engine_bench.py (bench/results/engine.json; the TED step at 2 ranks). A ratio far above 1
means the loader can never starve the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, tiny_world  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ted-ds-bench"))
    args = ap.parse_args(argv)
    from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset, collate

    world = tiny_world(args.workdir)
    seq_len, micro, global_batch = 128, 4, 16
    data = PackedShardDataset(world["data"], "train", seq_len)
    sampler = ConsumedSamplesSampler(len(data), global_batch, micro, 0, 2, seed=1)
    steps = 50 if args.quick else 500
    start = time.perf_counter()
    for _ in range(steps):
        for idx in sampler.next_batch():
            collate(data, idx)
    elapsed = time.perf_counter() - start
    loader_tps = steps * (global_batch // 2) * seq_len / elapsed  # one rank's tokens
    engine_path = os.path.join(REPO, "bench", "results", "engine.json")
    train_tps = None
    if os.path.isfile(engine_path):
        train_tps = json.load(open(engine_path))["placements"]["replicated@2"]["tokens_per_s"] / 2
    result = {"loader_tokens_per_s_per_rank": loader_tps, "training_tokens_per_s_per_rank": train_tps,
              "ratio": loader_tps / train_tps if train_tps else None}
    print(f"loader: {loader_tps:,.0f} tokens/s per rank; training consumes "
          f"{train_tps:,.0f} tokens/s per rank -> loader {result['ratio']:,.0f}x faster" if train_tps else
          f"loader: {loader_tps:,.0f} tokens/s per rank (run engine_bench.py for the comparison)")
    with open(os.path.join(REPO, "bench", "results", "loader.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
