"""Scale rehearsal on CPU: does each rank hold only what it must, at a size where it matters?

    python -m bench scale [--quick]

A random LLaMA-shaped teacher of 1.55 B parameters (d=1536, 46 layers, vocabulary 128k, bf16
safetensors written here once and cached) and a student made of two of its blocks (0.44 B,
``student.init_from_teacher``)
are trained with KD for a few steps on 2 ranks, under a bf16 ZeRO-3 config, once per teacher
placement.  For each rank, the peak RSS above the empty process (after imports and the process
group, measured in the same process) is divided by the bytes that rank must hold:

* its teacher share in bf16: the whole teacher (replicated), 1/W of it (zero3), its pipeline stage;
* its 1/W of the student at 18 bytes/param (bf16 weights, fp32 master, fp32 Adam moments, fp32
  gradients), all ZeRO-3 shards;
* ZeRO-3's working set: the largest student parameter gathered whole in bf16 plus its fp32 gradient,
  and its gradient bucket (``reduce_bucket_size``, 5e7 elements here);
* activations: the (tokens × vocab) logits of student and teacher and the logits' gradient, and the
  pipeline's one chunk of teacher logits in flight
(``ted_ds.capacity.rank_floor_bytes``, the floor every run is checked against before it loads).

Goal ≤ 1.25 for every placement.  Then the chunked CE + KD loss against the unchunked one at
128k vocabulary (``python -m bench kd``; on CPU at the token count that fits the unchunked one).
The last line is one JSON object: ``rss_over_floor`` (placement → ratio), ``kd_memory_ratio``,
``kd_time_ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import kd_bench  # noqa: E402
from bench.common import REPO, machine, run, tiny_world  # noqa: E402
from ted_ds.launch import local_deepspeed_command as deepspeed  # noqa: E402

SHAPES = {  # LLaMA shapes: the rehearsal, and a tiny one for the tests
    "full": dict(vocab_size=128256, hidden_size=1536, intermediate_size=4096, num_hidden_layers=46,
                 num_attention_heads=12, num_key_value_heads=4),
    "quick": dict(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
}
STUDENT_BLOCKS = [0, 2]
REDUCE_BUCKET = 50_000_000
WORLD, SEQ_LEN, MICRO_BATCH = 2, 128, 1


def big_teacher(workdir: str, shape: dict, tokenizer: str) -> str:
    """A random teacher in bf16 safetensors, cached by shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from data_prep.tokenizer import load_tokenizer

    key = "-".join(str(v) for v in shape.values())
    path = os.path.join(workdir, f"teacher-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = load_tokenizer(tokenizer)
    config = LlamaConfig(max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path + ".tmp", safe_serialization=True)
    tok.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def bf16_config(workdir: str) -> str:
    """The CPU ZeRO-3 config with bf16 on (the teacher computes in bf16, as it would on GPUs) and a
    gradient bucket of 5e7 elements instead of DeepSpeed's 5e8 (1 GB of bf16 a rank would hold)."""
    with open(os.path.join(REPO, "ds_configs", "zero3_cpu.json")) as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": True}
    ds["zero_optimization"]["reduce_bucket_size"] = REDUCE_BUCKET
    path = os.path.join(workdir, "zero3_cpu_bf16.json")
    with open(path, "w") as f:
        json.dump(ds, f, indent=2)
    return path


def floor_bytes(placement: str, teacher: str) -> float:
    """What one rank must hold (module docstring): ted_ds.capacity's floor, which runs are checked against."""
    import torch

    from ted_ds.architectures import load_hf_config, teacher_blocks_config
    from ted_ds.capacity import chunk_tokens, rank_floor_bytes

    t_config = load_hf_config(teacher)
    return rank_floor_bytes(t_config, teacher_blocks_config(t_config, STUDENT_BLOCKS), placement, WORLD, 2, None,
                            torch.bfloat16, SEQ_LEN * MICRO_BATCH, REDUCE_BUCKET, chunk_tokens(MICRO_BATCH, SEQ_LEN, 1))


def main(argv=None) -> dict:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the tests)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ted-ds-scale-bench"))
    args = ap.parse_args(argv)
    shape = SHAPES["quick" if args.quick else "full"]
    world = tiny_world(os.path.join(args.workdir, "world"))
    teacher = big_teacher(args.workdir, shape, world["tokenizer"])
    ds_config = bf16_config(args.workdir)
    results = {"machine": machine(), "shape": shape, "placements": {}}
    for placement in ("replicated", "zero3", "pipeline"):
        cfg = {"teacher": {"path": teacher, "placement": placement, "pipeline_stages": 2},
               "student": {"init_from_teacher": STUDENT_BLOCKS},
               "data": {"path": world["data"], "seq_len": SEQ_LEN},
               "distill": {"method": "kd"},
               "train": {"out_dir": os.path.join(args.workdir, placement), "micro_batch_size": MICRO_BATCH,
                         "global_batch_size": MICRO_BATCH * WORLD, "steps": 10, "deepspeed_config": ds_config,
                         "progress": False}}
        path = os.path.join(args.workdir, f"{placement}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        out = os.path.join(args.workdir, f"{placement}.json")
        run(deepspeed(WORLD, os.path.join(REPO, "bench", "mp_engine_bench.py"), "--config", path, "--out", out,
                      "--warmup", "1", "--steps", "1"), env={"DS_ACCELERATOR": "cpu"})
        ranks = json.load(open(out))
        floor = floor_bytes(placement, teacher)
        above_base = [(r["peak_rss_mb"] - r["rss_before_build_mb"]) * 2**20 for r in ranks]
        results["placements"][placement] = {
            "peak_rss_mb": [r["peak_rss_mb"] for r in ranks], "base_rss_mb": [r["rss_before_build_mb"] for r in ranks],
            "floor_mb": floor / 2**20, "ratio": max(above_base) / floor}
    report(results)
    if not args.quick:
        with open(os.path.join(REPO, "bench", "results", "scale.json"), "w") as f:
            json.dump(results, f, indent=2)
    kd = kd_bench.main(["--device", "cpu"] + (["--quick"] if args.quick else []))
    summary = {"rss_over_floor": {k: round(v["ratio"], 3) for k, v in results["placements"].items()},
               "kd_memory_ratio": kd["kd_memory_ratio"], "kd_time_ratio": kd["kd_time_ratio"],
               "kd_tokens": kd["tokens"]}
    print(json.dumps(summary))
    return results


def report(r: dict) -> None:
    print(f"{'placement':<12}{'peak RSS MB (ranks)':>24}{'base MB':>10}{'floor MB':>10}{'ratio':>8}   goal <= 1.25")
    for name, v in r["placements"].items():
        peaks = "/".join(f"{x:.0f}" for x in v["peak_rss_mb"])
        print(f"{name:<12}{peaks:>24}{max(v['base_rss_mb']):>10.0f}{v['floor_mb']:>10.0f}{v['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
