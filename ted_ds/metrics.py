"""Metrics out of the trainer: TensorBoard scalars, a JSONL file, a progress bar, and MFU
(the FLOPs a token costs, and the peak a device can do).

Only rank 0 writes.  ``metrics.jsonl`` holds one JSON object per logged step, each naming its job (the
recipe: several jobs may share an out_dir, each keeps its lines); on resume, the job's lines past the
resumed step (written by the interrupted attempt) are dropped so curves stay clean, and a
``{"step": N, "job": ..., "resumed_from": TAG}`` line marks where the relaunch took over (with the safe
config changes it made, if any).  TensorBoard events go to ``tb/<job>``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

from data_prep.fileio import write_text
from ted_ds.architectures import hidden_size, ndim, num_layers
from ted_ds.distributed import synchronize

# Dense bf16 peak TFLOPs per device of common GPUs (vendor datasheets, no sparsity).
_GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
                    "V100": 125.0, "MI300X": 1307.0, "B200": 2250.0}


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in matrix products (the N of 6·N FLOPs per token): every weight
    matrix except input/position embeddings, plus the output head even when it is tied."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if ndim(p) >= 2 and id(p) not in embeddings)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:
        n += getattr(head.weight, "ds_numel", head.weight.numel())
    return n


def flops_per_token(n_matmul: int, config, seq_len: int, training: bool) -> float:
    """6N + 12·L·d·T per trained token (forward + backward), a third of it for a forward only."""
    per_token = 6 * n_matmul + 12 * num_layers(config) * hidden_size(config) * seq_len
    return per_token if training else per_token / 3


def device_peak_flops(configured_tflops: float | None, device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device: configured (``train.peak_tflops``), looked up by GPU name (dense
    bf16), else measured by a matmul in the run's ``dtype`` on ``device`` itself — never a CPU figure
    for a GPU the table does not know, and on a CPU what its vector units do in that dtype."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return measured_matmul_flops(device, dtype)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of an n×n matmul on ``device``, waiting for the device before the clock stops."""
    gen = torch.Generator().manual_seed(0)  # not the global one: training's random streams stay untouched
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def kept_lines(lines, job: str, start_step: int) -> list[str]:
    """What a launch of ``job`` resuming at ``start_step`` keeps of metrics.jsonl: every other job's lines,
    and its own up to that step (the steps after it are trained again).  Lines without a job are this
    job's (written before lines carried one)."""
    kept = []
    for line in filter(str.strip, lines):
        row = json.loads(line)
        if row.get("job", job) != job or row.get("step", 0) <= start_step:
            kept.append(line)
    return kept


class MetricsLogger:
    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 desc: str):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        self.job = desc
        if os.path.exists(path):
            with open(path) as f:
                write_text(path, "".join(kept_lines(f, desc, start_step)))
        self.jsonl = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out_dir, "tb", desc), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "job": self.job, **scalars}) + "\n")
        self.jsonl.flush()

    def resumed(self, tag: str, step: int, consumed: int, changed: dict[str, tuple]) -> None:
        """Say (and record in the JSONL) where this launch took over, and the safe config keys it changed
        (``config.SAFE_TO_CHANGE``, as key → (old, new)): the lines after it are its own."""
        changes = "".join(f"; {key} {old!r} -> {new!r} from here on" for key, (old, new) in changed.items())
        self.message(f"ted-ds: resumed from {tag} (step {step}, {consumed} samples consumed){changes}")
        if self.enabled:
            row = {"step": step, "job": self.job, "resumed_from": tag}
            if changed:
                row["config_changed"] = {key: list(values) for key, values in changed.items()}
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()

    def advance(self, step: int, postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(step - self.bar.n)  # redraws at most once per second

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
