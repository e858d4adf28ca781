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
import re
import sys
import time
import warnings

import torch
from torch import nn

from data_prep.fileio import write_text
from ted_ds.architectures import hidden_size, ndim, num_layers
from ted_ds.distributed import synchronize

# Dense peak TFLOP/s per GPU model and dtype (vendor datasheets, no sparsity; fp32 without tensor cores).
# First match wins: each variant (PCIe, NVL) before its family's SXM default. None: no such unit.
_GPU_PEAKS = (  # (name pattern, {dtype: TFLOP/s})
    (r"\bH100\b.*\bPCIE\b", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"\bH100\b|\bGH200\b", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"\bH200\b.*\bNVL\b", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"\bH200\b", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # SXM and PCIe alike
    (r"\bL40S\b", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"\bA10G?\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    (r"\bV100\b", {"bf16": None, "fp16": 125.0, "fp32": 15.7}),
    (r"\bMI300X\b", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "fp32": None}),
)
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


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


def device_peak_flops(configured_tflops: float | None, device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device: configured (``train.peak_tflops``), a GPU's datasheet figure for its
    model and ``dtype`` (``gpu_peak_tflops``), on a CPU what its vector units do in ``dtype`` (measured).
    A GPU the table does not know gives None and one warning: no MFU rather than a guessed one (a small
    matmul understates the peak, so MFU would be overstated)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return measured_matmul_flops(device, dtype)
    name = torch.cuda.get_device_name(device)
    tflops = gpu_peak_tflops(name, dtype)
    if tflops is None:
        warnings.warn(f"no datasheet peak for {name} in {str(dtype).removeprefix('torch.')}: MFU not reported "
                      "(set train.peak_tflops to the device's dense peak)", stacklevel=2)
        return None
    return tflops * 1e12


def gpu_peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The dense peak TFLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name``) in ``dtype``;
    None when the table has no figure for it."""
    key = _DTYPE_KEYS.get(dtype)
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, name.upper()):
            return peaks.get(key)
    return None


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
