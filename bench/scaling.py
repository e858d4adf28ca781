"""Scaling on paper: a 1B student distilled from a 7B teacher on 8 and 64 H100s (ZeRO-3 + pipeline).

    python bench/scaling.py [--engine-results bench/results/engine.json]

Every number below comes from these formulas (per token, sequence length S, B = micro-batch):

    FLOPs  student train   F_s = 6·N_s + 12·L_s·d_s·S          (forward + backward, PaLM appendix B)
           teacher forward F_t = 2·N_t + 4·L_t·d_t·S
    time/token on one GPU  = F_s / (peak·u_s) + F_t / (peak·u_t) / (1 − bubble) + TED overhead
           u_s, u_t: achieved utilisation of a dense bf16 step (assumed 0.40 and 0.50 on H100),
           bubble = (P − 1) / (P·C + P − 1) for P teacher stages and C chunks per rank,
           TED overhead: the measured (TED step / (LM step + teacher forward) − 1) from engine.json.
    ZeRO-3 traffic per step per GPU = 3 · 2·N_s bytes (all-gather in forward and backward, reduce-scatter)
           over NVLink (450 GB/s) inside a node, InfiniBand (50 GB/s per GPU) across nodes; overlapped
           with compute except for the fraction `1 − overlap` (assumed 0.3 exposed).
    Pipeline traffic per token = (P − 1)·d_t·2 bytes of activations + V·2 bytes of bf16 logits (or 2·k·(2+8)
           with top-k), exposed only when it exceeds the stage's compute.
    memory/GPU  student ZeRO-3: 16·N_s / W   (bf16 weights + grads, fp32 master + Adam m, v)
                teacher: 2·N_t / P (pipeline) · or 2·N_t (replicated) · or 2·N_t / W (ZeRO-3)
                activations (student, checkpointed blocks): 2·S·B·d_s·L_s + 34·S·B·d_s (one live block)
                logits: 2 · 4·S·B·V (student + teacher fp32 for the losses)
    MFU = tokens/s · (F_s + F_t) / (W · peak)
"""

from __future__ import annotations

import argparse
import json
import os

PEAK = 989e12  # H100 SXM dense bf16
U_STUDENT, U_TEACHER, EXPOSED = 0.40, 0.50, 0.3
NVLINK, IB = 450e9, 50e9

# LLaMA-shaped models: (layers, d_model, ffn, vocab)
STUDENT = {"name": "1.1B student (22×2048)", "L": 22, "d": 2048, "ffn": 5632, "V": 32000}
TEACHER = {"name": "6.7B teacher (32×4096)", "L": 32, "d": 4096, "ffn": 11008, "V": 32000}


def params(m: dict) -> float:
    """Matmul parameters: attention 4d², SwiGLU MLP 3·d·ffn per layer, plus the output head."""
    return m["L"] * (4 * m["d"] ** 2 + 3 * m["d"] * m["ffn"]) + m["d"] * m["V"]


def total_params(m: dict) -> float:
    return params(m) + m["d"] * m["V"]  # + input embedding


def plan(gpus: int, stages: int, chunks: int, ted_overhead: float, S: int = 2048, B: int = 4) -> dict:
    n_s, n_t = params(STUDENT), params(TEACHER)
    f_s = 6 * n_s + 12 * STUDENT["L"] * STUDENT["d"] * S
    f_t = 2 * n_t + 4 * TEACHER["L"] * TEACHER["d"] * S
    bubble = (stages - 1) / (stages * chunks + stages - 1)
    compute = f_s / (PEAK * U_STUDENT) + f_t / (PEAK * U_TEACHER) / (1 - bubble)
    tokens_per_step = S * B
    zero_bytes = 3 * 2 * total_params(STUDENT)
    bandwidth = NVLINK if gpus <= 8 else IB
    zero_exposed = EXPOSED * zero_bytes / bandwidth / tokens_per_step
    pipe_bytes = (stages - 1) * TEACHER["d"] * 2 + TEACHER["V"] * 2
    pipe_time = pipe_bytes / (NVLINK if gpus <= 8 or stages <= 8 else IB)
    per_token = compute * (1 + ted_overhead) + zero_exposed + max(0.0, pipe_time - f_t / (PEAK * U_TEACHER))
    tps = gpus / per_token
    mem = {"student_zero3": 16 * total_params(STUDENT) / gpus,
           "teacher_pipeline": 2 * total_params(TEACHER) / stages,
           "activations": 2 * S * B * STUDENT["d"] * STUDENT["L"] + 34 * S * B * STUDENT["d"],
           "logits": 2 * 4 * S * B * STUDENT["V"]}
    return {"gpus": gpus, "stages": stages, "chunks": chunks, "bubble": bubble, "tokens_per_s": tps,
            "mfu": tps * (f_s + f_t) / (gpus * PEAK), "memory_gb": {k: v / 1e9 for k, v in mem.items()},
            "memory_total_gb": sum(mem.values()) / 1e9,
            "replicated_teacher_gb": 2 * total_params(TEACHER) / 1e9}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-results", default=os.path.join(os.path.dirname(__file__), "results", "engine.json"))
    args = ap.parse_args(argv)
    overhead = 0.10
    if os.path.isfile(args.engine_results):
        overhead = max(0.0, json.load(open(args.engine_results))["overhead"]["ratio"] - 1.0)
    rows = [plan(8, 2, 4, overhead), plan(64, 2, 4, overhead), plan(64, 4, 4, overhead)]
    print(f"{STUDENT['name']} ({total_params(STUDENT) / 1e9:.2f}B) distilled from {TEACHER['name']} "
          f"({total_params(TEACHER) / 1e9:.2f}B), S=2048, micro-batch 4, H100 bf16; TED overhead "
          f"{overhead:.2f} (measured)")
    print(f"{'GPUs':>5}{'P':>3}{'bubble':>8}{'tokens/s':>11}{'MFU':>6}{'GB/GPU':>8}"
          "   (student + teacher + act + logits; replicated teacher alone would be)")
    for r in rows:
        m = r["memory_gb"]
        print(f"{r['gpus']:>5}{r['stages']:>3}{r['bubble']:>8.2f}{r['tokens_per_s']:>11,.0f}{r['mfu']:>6.2f}"
              f"{r['memory_total_gb']:>8.1f}   ({m['student_zero3']:.1f} + {m['teacher_pipeline']:.1f} + "
              f"{m['activations']:.1f} + {m['logits']:.1f}; {r['replicated_teacher_gb']:.1f})")
    with open(os.path.join(os.path.dirname(__file__), "results", "scaling.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
