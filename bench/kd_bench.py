"""Memory and time of the CE + KD loss: chunked (ted_ds.losses) vs the unchunked code it replaced.

    python bench/kd_bench.py [--tokens 8192] [--vocab 128256] [--device cpu|cuda] [--quick]

One step = distill_objective's CE + α·KD on bf16 student and teacher logits (tokens × vocab; the
student's a leaf that needs a gradient), forward and backward. Peak memory: on CUDA
max_memory_allocated minus what the inputs hold; on CPU each variant runs in a fresh process and
reports peak RSS minus the RSS just before its first step. On CPU the token count is halved until the
unchunked variant fits in the available memory (the output says so). Goals: memory ratio <= 0.35,
time ratio <= 1.1. Full runs write their device's entry of bench/results/kd.json; --quick writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import REPO, machine  # noqa: E402
from ted_ds.distributed import synchronize  # noqa: E402
from ted_ds.losses import ObjectiveWeights, distill_objective  # noqa: E402

WEIGHTS = ObjectiveWeights(alpha=0.5, beta=0.0, temperature=2.0, layer_loss="mse")
UNCHUNKED_BYTES_PER_LOGIT = 40  # per tokens × vocab: 24 measured for the unchunked step, + inputs, + margin


def unchunked_step(student, teacher, labels):
    """The losses as they were before chunking: autograd through full (tokens × vocab) fp32 tensors."""
    lm = F.cross_entropy(student.float(), labels)
    s_logp = F.log_softmax(student.float() / WEIGHTS.temperature, dim=-1)
    t_logp = F.log_softmax(teacher.float() / WEIGHTS.temperature, dim=-1)
    kd = WEIGHTS.temperature ** 2 * (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    return lm + WEIGHTS.alpha * kd


def chunked_step(student, teacher, labels):
    return distill_objective(student[None], None, labels[None], teacher[None], None, WEIGHTS)["loss"]


VARIANTS = {"chunked": chunked_step, "unchunked": unchunked_step}


def measure(variant: str, tokens: int, vocab: int, device: str, repeats: int) -> dict:
    """Peak extra memory (MB) and median seconds of ``repeats`` forward + backward steps."""
    step = VARIANTS[variant]
    torch.manual_seed(0)
    student = torch.randn(tokens, vocab, dtype=torch.bfloat16, device=device).requires_grad_()
    teacher = torch.randn(tokens, vocab, dtype=torch.bfloat16, device=device)
    labels = torch.randint(vocab, (tokens,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    times = []
    for _ in range(repeats):
        student.grad = None
        start = time.perf_counter()
        step(student, teacher, labels).backward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": (peak - base) / 2 ** 20, "step_s": statistics.median(times[1:] or times), "steps": repeats}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_in_fresh_process(variant: str, tokens: int, vocab: int, repeats: int) -> dict:
    """CPU: a process of its own, so that ru_maxrss sees this variant alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--tokens", str(tokens),
           "--vocab", str(vocab), "--repeats", str(repeats)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def tokens_that_fit(tokens: int, vocab: int) -> int:
    """Halve ``tokens`` until the unchunked step fits in MemAvailable."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    while tokens > 256 and tokens * vocab * UNCHUNKED_BYTES_PER_LOGIT > available:
        tokens //= 2
    return tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=4, help="steps per variant; the first is a warm-up")
    ap.add_argument("--quick", action="store_true",
                    help="2048 tokens × 8192 vocabulary, 2 steps: a smoke run, too small for meaningful ratios")
    ap.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.repeats = 2048, 8192, 2
    if args.worker:
        result = measure(args.worker, args.tokens, args.vocab, "cpu", args.repeats)
        print(json.dumps(result))
        return result

    tokens = args.tokens
    if args.device == "cpu":
        tokens = tokens_that_fit(args.tokens, args.vocab)
        if tokens != args.tokens:
            print(f"note: {args.tokens} tokens × {args.vocab} would not fit the unchunked variant in this machine's "
                  f"available memory on CPU; measuring {tokens} tokens instead")
        runs = {v: measure_in_fresh_process(v, tokens, args.vocab, args.repeats) for v in VARIANTS}
    else:
        runs = {v: measure(v, tokens, args.vocab, "cuda", args.repeats) for v in VARIANTS}
    result = {"machine": machine(), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "tokens": tokens, "vocab": args.vocab, **runs,
              "kd_memory_ratio": runs["chunked"]["peak_mb"] / runs["unchunked"]["peak_mb"],
              "kd_time_ratio": runs["chunked"]["step_s"] / runs["unchunked"]["step_s"]}
    report(result)
    if not args.quick:
        save(args.device, result)
    print(json.dumps({k: result[k] for k in ("kd_memory_ratio", "kd_time_ratio", "tokens", "vocab", "device")}))
    return result


def save(device: str, result: dict) -> None:
    """bench/results/kd.json keeps the latest full run of each device kind side by side."""
    path = os.path.join(REPO, "bench", "results", "kd.json")
    saved = json.load(open(path)) if os.path.isfile(path) else {}
    saved[device] = result
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)


def report(r: dict) -> None:
    print(f"CE + KD forward + backward, {r['tokens']} tokens × {r['vocab']} vocabulary, bf16 logits, {r['device']}")
    print(f"{'variant':<12}{'peak MB':>10}{'step s':>10}")
    for variant in VARIANTS:
        print(f"{variant:<12}{r[variant]['peak_mb']:>10.0f}{r[variant]['step_s']:>10.3f}")
    print(f"memory ratio {r['kd_memory_ratio']:.3f} (goal <= 0.35), time ratio {r['kd_time_ratio']:.3f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
