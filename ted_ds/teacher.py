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

import hashlib
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
    topk_index: torch.Tensor | None = None  # (B, T, k) when logits are top-k (or the sampled ids)
    counts: torch.Tensor | None = None  # (B, T, N) draws of each sampled id (teacher.logits_sampling: sampled)
    support: torch.Tensor | None = None  # (B, T, k) bool: the top-k entries each token keeps (top-p)


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


@dataclass(frozen=True)
class TopP:
    """teacher.logits_top_p: per token, the fewest of the top-k whose probability at ``temperature`` reaches p."""

    p: float
    temperature: float


def top_p_of(cfg) -> TopP | None:
    """The run's top-p cut (``RunConfig``), None without teacher.logits_top_p."""
    p = cfg.teacher.logits_top_p
    return None if p is None else TopP(p, cfg.distill.temperature)


def teacher_logits(logits: torch.Tensor, vocab: int | None, k: int, dtype: torch.dtype = torch.float32,
                   tail_temperature: float | None = None,
                   top_p: TopP | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's logits as KD reads them: cut to the tokenizer's ``vocab`` ids, the k largest per token
    with their ids (k = 0: all, no ids), rounded to ``dtype`` (fp32 rounds nothing; narrower logits stay
    as they are). Every placement and ``cache-teacher`` call this one function, so a cached run and the
    same run with the teacher online compare the student with the same numbers.

    With k > 0 and ``tail_temperature`` T (top-k KD's tail form) a (k + 1)-th value follows the top-k: the
    tail logit T·log Σ_{i∉K} exp(z_i/T), computed in fp32 from every logit, so that softmax over the k + 1
    values at T gives the teacher's probabilities on K and its mass off K (−inf at k = V: no tail).

    With ``top_p`` the top-k entries past a token's support (``top_p_support``) are −inf with the top id for
    theirs (as the cache gives them back), and in the tail form their mass is in the tail logit: K is then
    the support."""
    logits = logits[..., :vocab]
    values, index = (logits, None) if k <= 0 else logits.topk(k, dim=-1)
    kept = None if index is None or top_p is None else top_p_support(values, logits, top_p)
    if index is not None and tail_temperature is not None:
        off_top = logits.float().scatter(-1, index, -math.inf) / tail_temperature
        if kept is not None:  # the dropped top-k entries join the tail
            off_top = off_top.scatter(-1, index, values.float().masked_fill(kept, -math.inf) / tail_temperature)
        values = torch.cat([values.float(), tail_temperature * off_top.logsumexp(-1, keepdim=True)], -1)
    if kept is not None:  # past the support: −inf, and the top id (one id per row for every dropped entry)
        values = torch.cat([values[..., :k].masked_fill(~kept, -math.inf), values[..., k:]], -1)
        index = index.where(kept, index[..., :1])
    if dtype != torch.float32:
        values = values.to(dtype)
    return values, index


def top_p_support(top_values: torch.Tensor, logits: torch.Tensor, top_p: TopP) -> torch.Tensor:
    """(…, k) bool: the top-k entries (``top_values``, largest first) a token keeps — those whose softened
    probabilities before them sum to less than p, so the kept ones are the fewest whose sum reaches p."""
    log_z = (logits.float() / top_p.temperature).logsumexp(-1, keepdim=True)
    probs = (top_values.float() / top_p.temperature - log_z).exp()  # (…, k), descending
    return probs.cumsum(-1) - probs < top_p.p


def support(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(…, k) bool: the top-k entries a token keeps, those not −inf (``teacher_logits`` with top-p)."""
    return values[..., :index.shape[-1]] > -math.inf


def draw_seed(seed: int, source: str, split: str, window: int) -> int:
    """The seed of one window's draws (teacher.logits_sampling: sampled): train.seed and the window (its data
    source's key, split and index), so every rank count, batch, resume and cache build draws the same."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{source}/{split}/{window}".encode()).digest()[:8], "little")


def sampled_logits(logits: torch.Tensor, seeds: list[int], n: int, temperature: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` draws per position from softmax(logits/T), logits (B, L, V), row b's from ``seeds[b]``: (log p at
    the drawn ids rounded to ``dtype``, the distinct ids ascending, how often each was drawn), each (B, L, n),
    padded with 0 past a position's distinct ids. The uniforms come from a CPU generator (the same on every
    device); an id is drawn by inverting the cumulative p."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, L, V)
    cdf = logp.exp().cumsum(-1)
    uniforms = torch.stack([torch.rand(logits.shape[1], n, generator=torch.Generator().manual_seed(s))
                            for s in seeds]).to(logits.device)  # (B, L, n)
    drawn = torch.searchsorted(cdf, uniforms * cdf[..., -1:]).clamp_(max=logits.shape[-1] - 1)
    ids, counts = distinct_counts(drawn)
    values = logp.gather(-1, ids).masked_fill_(counts == 0, 0.0)
    return values.to(dtype) if dtype != torch.float32 else values, ids, counts


@dataclass(frozen=True)
class Draws:
    """teacher.logits_sampling: sampled, online: how a micro-batch's windows draw from the teacher's logits."""

    seed: int  # train.seed
    n: int  # teacher.logits_samples
    temperature: float  # distill.temperature
    dtype: torch.dtype  # teacher.logits_dtype
    keys: tuple[str, ...]  # the data sources' cache keys (ted_ds.cache.format.source_key), in blend order
    starts: tuple[int, ...]  # where each source's train windows start in the sampler's index, then the end

    def __call__(self, logits: torch.Tensor, samples: list[int]) -> tuple[torch.Tensor, ...]:
        """``sampled_logits`` of a micro-batch's full logits (B, L, V), its windows found by sample index."""
        from ted_ds.cache.format import locate

        windows = (locate(self.starts, self.keys, i) for i in samples)
        seeds = [draw_seed(self.seed, key, "train", j) for key, j in windows]
        return sampled_logits(logits, seeds, self.n, self.temperature, self.dtype)


def distinct_counts(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``drawn`` (…, n): its distinct ids ascending and how many times each occurs, padded with
    id 0 and count 0 to n."""
    ordered = drawn.sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = torch.arange(ordered.shape[-1], device=drawn.device).expand_as(ordered)
    run_start = slot.masked_fill(~first, ordered.shape[-1]).sort(-1).values  # the runs' starts, then n
    run_end = torch.cat([run_start[..., 1:], torch.full_like(run_start[..., :1], ordered.shape[-1])], -1)
    real = slot < first.sum(-1, keepdim=True)
    counts = torch.where(real, run_end - run_start, 0)
    ids = ordered.gather(-1, run_start.clamp(max=ordered.shape[-1] - 1)).masked_fill_(~real, 0)
    return ids, counts


def teacher_side(frozen: Teacher | None, batch, from_cache: bool = False, draws: Draws | None = None,
                 top_p: bool = False) -> TeacherOutput | None:
    """The teacher's outputs for a micro-batch (``ted_ds.data.MicroBatch``): taps (and logits) from the running
    teacher; the logits from the cache when the run has one (``from_cache``: the batch's ``teacher_rows``,
    read ahead by the data path), or drawn from the teacher's (``draws``); with ``top_p`` each token's
    support, read from the logits."""
    t = frozen(batch.input_ids) if frozen is not None else None
    if from_cache:
        values, index, counts = batch.teacher_rows
        t = TeacherOutput(t and t.taps, values, index, counts)
    elif draws is not None and t is not None and t.logits is not None:
        t = TeacherOutput(t.taps, *draws(t.logits, batch.samples))
    if top_p and t is not None and t.topk_index is not None:
        t.support = support(t.logits, t.topk_index)
    return t


class FrozenLM(TappedLM):
    """A ``TappedLM`` evaluated without gradients, its logits cut to the tokenizer's ids (and to the top-k
    when asked) as KD reads them: a ``TeacherOutput``, what every placement of the frozen side returns.
    ``filters=None`` returns raw states (stage 1, LWD)."""

    def __init__(self, model: nn.Module, layers: list[int], filters: FilterBank | None, need_logits: bool,
                 logits_topk: int = 0, documents: DocumentAttention | None = None, vocab: int | None = None,
                 logits_dtype: torch.dtype = torch.float32, tail_temperature: float | None = None,
                 top_p: TopP | None = None):
        super().__init__(model, layers, filters, documents)
        self.vocab = vocab  # logits keep the tokenizer's ids only (None: every row of the head)
        self.need_logits = need_logits
        self.logits_topk = logits_topk
        self.logits_dtype = logits_dtype
        self.tail_temperature = tail_temperature  # top-k in the tail form: the tail logit at this T
        self.top_p = top_p  # teacher.logits_top_p: each token's support within the top-k
        self.requires_grad_(False)
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> TeacherOutput:
        logits, taps = super().forward(input_ids)
        if not self.need_logits:
            return TeacherOutput(taps, None)
        return TeacherOutput(taps, *teacher_logits(logits, self.vocab, self.logits_topk, self.logits_dtype,
                                                   self.tail_temperature, self.top_p))


class ReplicatedTeacher:
    """A full copy of the frozen model on this rank."""

    placement = "replicated"

    def __init__(self, frozen: FrozenLM, device: torch.device):
        self.frozen = frozen.to(device)
        self.device = device

    @torch.no_grad()
    @record_function("teacher")  # names the frozen side's work in a profile (bench/profile_bench.py)
    def __call__(self, input_ids: torch.Tensor) -> TeacherOutput:
        return self.frozen(input_ids.to(self.device))

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
        return self.engine(input_ids.to(self.engine.device))

    def local_parameters(self) -> int:
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.engine.module.parameters())
