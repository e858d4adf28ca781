"""The frozen side: a model that answers "filtered states at the taps + logits for this micro-batch".

Every placement implements the same call, ``teacher(input_ids) -> TeacherOutput`` (the
``Teacher`` protocol, what the trainer relies on):

* ``ReplicatedTeacher``: a full copy on each rank.
* ``Zero3Teacher``: parameters sharded over all ranks by a ZeRO-3 inference engine.
* ``PipelineTeacher`` (``ted_ds.pipeline.schedule``): layers split over the ranks of a pipeline group.

The same frozen wrapper serves stage 1 (raw states of teacher or student, no logits) and stage 2
(teacher states through its frozen filters, plus logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.autograd.profiler import record_function

from ted_ds.architectures import count_parameters
from ted_ds.documents import DocumentAttention
from ted_ds.filters import FilterBank
from ted_ds.taps import TappedLM


@dataclass
class TeacherOutput:
    taps: list[torch.Tensor] | None  # (B, T, D_filter) per tap, filtered (or raw when no bank)
    logits: torch.Tensor | None  # (B, T, V), or (B, T, k) top-k values (+ the tail logit: k + 1)
    topk_index: torch.Tensor | None = None  # (B, T, k) when logits are top-k


class Teacher(Protocol):
    """A placed frozen model: the trainer calls it per micro-batch and reports its per-rank size."""

    placement: str  # "replicated" | "zero3" | "pipeline", as teacher.placement

    def __call__(self, input_ids: torch.Tensor) -> TeacherOutput:
        """Taps (and logits when asked) for this rank's micro-batch, without gradients."""
        ...

    def local_parameters(self) -> int:
        """Parameters stored on this rank (its share of the frozen model)."""
        ...


LOGITS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # teacher.logits_dtype


def teacher_logits(logits: torch.Tensor, vocab: int | None, k: int, dtype: torch.dtype = torch.float32,
                   tail_temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits as KD reads them: cut to the tokenizer's ``vocab`` ids, the k largest per token
    with their ids (k = 0: all, no ids), rounded to ``dtype`` (fp32 rounds nothing; narrower logits stay
    as they are). Every placement and ``cache-teacher`` call this one function, so a cached run and the
    same run with the teacher online compare the student with the same numbers.

    With k > 0 and ``tail_temperature`` T (top-k KD's tail form) a (k + 1)-th value follows the top-k: the
    tail logit T·log Σ_{i∉K} exp(z_i/T), computed in fp32 from every logit, so that softmax over the k + 1
    values at T gives the teacher's probabilities on K and its mass off K (−inf at k = V: no tail)."""
    logits = logits[..., :vocab]
    values, index = (logits, None) if k <= 0 else logits.topk(k, dim=-1)
    if index is not None and tail_temperature is not None:
        off_top = logits.float().scatter(-1, index, -math.inf) / tail_temperature
        values = torch.cat([values.float(), tail_temperature * off_top.logsumexp(-1, keepdim=True)], -1)
    if dtype != torch.float32:
        values = values.to(dtype)
    return values, index


class FrozenLM(TappedLM):
    """A ``TappedLM`` evaluated without gradients, its logits cut to the tokenizer's ids (and to the top-k
    when asked) as KD reads them.  ``filters=None`` returns raw states (stage 1, LWD)."""

    def __init__(self, model: nn.Module, layers: list[int], filters: FilterBank | None, need_logits: bool,
                 logits_topk: int = 0, documents: DocumentAttention | None = None, vocab: int | None = None,
                 logits_dtype: torch.dtype = torch.float32, tail_temperature: float | None = None):
        super().__init__(model, layers, filters, documents)
        self.vocab = vocab  # logits keep the tokenizer's ids only (None: every row of the head)
        self.need_logits = need_logits
        self.logits_topk = logits_topk
        self.logits_dtype = logits_dtype
        self.tail_temperature = tail_temperature  # top-k in the tail form: the tail logit at this T
        self.requires_grad_(False)
        self.eval()

    def forward(self, input_ids: torch.Tensor):
        logits, taps = super().forward(input_ids)
        if not self.need_logits:
            return taps, None, None
        return taps, *teacher_logits(logits, self.vocab, self.logits_topk, self.logits_dtype, self.tail_temperature)


class ReplicatedTeacher:
    """A full copy of the frozen model on this rank."""

    placement = "replicated"

    def __init__(self, frozen: FrozenLM, device: torch.device):
        self.frozen = frozen.to(device)
        self.device = device

    @torch.no_grad()
    @record_function("teacher")  # names the frozen side's work in a profile (bench/profile_bench.py)
    def __call__(self, input_ids: torch.Tensor) -> TeacherOutput:
        return TeacherOutput(*self.frozen(input_ids.to(self.device)))

    def local_parameters(self) -> int:
        return count_parameters(self.frozen)


class Zero3Teacher:
    """The frozen model under a ZeRO-3 engine with no optimizer: each rank stores 1/W of it and
    parameters are gathered layer by layer during the forward."""

    placement = "zero3"

    def __init__(self, engine):
        self.engine = engine
        self.engine.eval()

    @torch.no_grad()
    @record_function("teacher")  # names the frozen side's work in a profile (bench/profile_bench.py)
    def __call__(self, input_ids: torch.Tensor) -> TeacherOutput:
        return TeacherOutput(*self.engine(input_ids.to(self.engine.device)))

    def local_parameters(self) -> int:
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.engine.module.parameters())
