"""Where a training step's time goes: the trainer's own step under torch.profiler, split by phase
and by kind of work.

    python -m bench profile [--ranks 2] [--steps 3] [--method ted] [k=v ...]

Phases come from the trainer's annotations (the innermost one around an op wins): ``teacher`` (the
frozen side's forward), ``loss`` (the objective with its closed-form gradients), ``forward`` (the
student and its filters), ``backward``, ``step`` (ZeRO-3's gradient reduction and the optimizer).
Kinds come from op names: GEMM, attention, communication, other ops (elementwise, norms, copies),
and "Python and hooks" (time inside an annotation but in no op: ZeRO-3's parameter hooks, Python).
Times are each op's own (self) time — on a CPU the CPU's; on a GPU the device time of the kernels the
op launched (each kernel counted once, on its op; an annotation's own device time is "kernels of no
op": DeepSpeed's fused Adam and other extension ops) — so the shares add up to the profiled time the
ops account for.  On a GPU the autograd engine runs the backward on a thread of its own: an op there
belongs to the phase whose annotation spans its start.  On CPU with gloo the shares say what the CPU
does; on a GPU the same table is the one the GPU check records (bench/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("teacher", "loss", "forward", "backward", "step")
KINDS = (("GEMM", re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul|linear)$|gemm|cutlass|xmma|cublas", re.I)),
         ("attention", re.compile(r"attention|flash|fmha|flex", re.I)),
         ("communication", re.compile(r"c10d::|nccl|gloo|all_?gather|reduce_?scatter|all_?reduce|broadcast", re.I)),
         ("other ops", re.compile(r"^aten::|^cuda|kernel|::", re.I)))


def phase_of(names: tuple[str, ...]) -> str:
    """The innermost phase annotation among an event and its ancestors (outermost first), else "outside"."""
    for name in reversed(names):
        if name in PHASES:
            return name
    return "outside"


def kind_of(name: str, on_device: bool = False) -> str:
    if name in PHASES:  # an annotation's own time: in it, but in no op
        return "kernels of no op" if on_device else "Python and hooks"
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "Python and hooks"


def breakdown(events: list[tuple[str, tuple[str, ...], float]], on_device: bool = False) -> dict[str, dict[str, float]]:
    """Shares of the total self time by phase and by kind, from (op name, ancestor names, self time)."""
    total = sum(t for _, _, t in events) or 1.0
    out: dict[str, dict[str, float]] = {"phase": {}, "kind": {}}
    for name, ancestors, t in events:
        for table, key in (("phase", phase_of((*ancestors, name))), ("kind", kind_of(name, on_device))):
            out[table][key] = out[table].get(key, 0.0) + t / total
    out["total_s"] = {"self_time": total / 1e6}
    return out


def profiled_events(prof, on_device: bool) -> list[tuple[str, tuple[str, ...], float]]:
    """(name, ancestor names, self µs) of every CPU-side event of a finished torch.profiler run.  On a
    GPU an op's self time is its kernels' device time; the kernel events themselves (and the device
    copies of annotations) are left out, or every kernel would count twice."""
    from torch.autograd import DeviceType

    events = [ev for ev in prof.events() if ev.device_type == DeviceType.CPU]
    spans = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in events if ev.name in PHASES)
    rows = []
    for ev in events:
        t = ev.self_device_time_total if on_device else ev.self_cpu_time_total
        if t > 0:
            rows.append((ev.name, enclosing(ev, spans), float(t)))
    return rows


def enclosing(ev, spans: list[tuple[float, float, str]]) -> tuple[str, ...]:
    """The names of an event's ancestors, outermost first; for an op in no phase (one of the autograd
    engine's thread, on a GPU), first the phases whose (start, end, name) span holds its start."""
    ancestors, parent = [], ev.cpu_parent
    while parent is not None:
        ancestors.append(parent.name)
        parent = parent.cpu_parent
    ancestors.reverse()
    if phase_of(tuple(ancestors)) != "outside" or ev.name in PHASES:
        return tuple(ancestors)
    start = ev.time_range.start
    return tuple(name for begin, end, name in spans if begin <= start < end) + tuple(ancestors)


def profile_steps(step, batches, on_device: bool) -> dict:
    """``step(micro)`` for each of ``batches`` under torch.profiler, as a breakdown."""
    from torch.profiler import ProfilerActivity, profile

    from ted_ds import distributed

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for micro in batches:
            step(micro)
        distributed.synchronize()
        wall = time.perf_counter() - start
    out = breakdown(profiled_events(prof, on_device), on_device)
    out["total_s"]["wall"] = wall  # self time ÷ wall: how busy the device (or the CPU thread) kept
    return out


def report(result: dict) -> str:
    lines = []
    for table in ("phase", "kind"):
        lines.append(f"{'by ' + table:<24}{'share':>8}")
        for key, share in sorted(result[table].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {key:<22}{share:>8.1%}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from bench.common import REPO, machine, tiny_world
    from bench.engine_bench import measure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after the timed ones)")
    ap.add_argument("--method", default="ted", choices=("ted", "lwd", "kd", "lm"))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ted-ds-bench"))
    args = ap.parse_args(argv)
    world = tiny_world(args.workdir)
    ranks = measure(world, args.workdir, f"profile-{args.method}", args.ranks, 2, "--profile-steps",
                    str(args.steps), **{"distill.method": args.method})
    result = {"machine": machine(), "method": args.method, "ranks": args.ranks, "rank0": ranks[0]["profile"]}
    print(f"{args.method} step, {args.ranks} ranks, rank 0, {args.steps} profiled steps")
    print(report(result["rank0"]))
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", f"profile-{args.method}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
