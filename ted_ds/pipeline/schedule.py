"""The pipeline teacher's forward-only schedule, in plain ``torch.distributed`` point-to-point calls:
DeepSpeed's PipelineEngine returns only last-stage outputs, sets global state that breaks a ZeRO-3
engine created afterwards, and hangs on a tuple mismatch.  A call runs in ticks: each stage runs
one chunk, then posts that tick's sends and receives as one batch in the order ``messages.transfers``
gives both sides, and waits for them, so no tag is needed to match a message and at most one
tick's messages are in flight.  Every wait has the run's timeout and fails with an error naming
the pipeline stage, not a hang."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

from ted_ds import distributed
from ted_ds.architectures import decoder_layers, teacher_hf_config
from ted_ds.config import check_pipeline_world
from ted_ds.errors import DistributedError
from ted_ds.filters import FilterBank
from ted_ds.pipeline.layout import PipelineLayout
from ted_ds.pipeline.messages import (
    Message,
    MessageKind,
    Transfer,
    buffer_shape,
    chunk_at,
    made_by,
    posts,
    returned_to,
)
from ted_ds.pipeline.stage import build_stage_model, run_pipeline_stage, stop_after
from ted_ds.taps import TapRecorder
from ted_ds.teacher import LOGITS_DTYPES, TeacherOutput, teacher_logits, top_p_of

Received = dict[Message, torch.Tensor]  # this rank's buffer for each message it gets back (or makes itself)
Made = dict[Message, torch.Tensor]  # what this stage made of a chunk, by message


def wait_for(work, backend: str, timeout: datetime.timedelta) -> bool:
    """Wait for ``work`` of a group of ``backend``; False if it timed out.  NCCL's ``wait(timeout)``
    blocks the CPU until the GPU has run the transfer (every tick a host–device sync, kernel launches
    no longer overlapping), while its plain ``wait()`` only orders the current stream after it: the
    group's own timeout (its watchdog) bounds an NCCL transfer, a gloo one is waited for with it."""
    if backend == "nccl":
        work.wait()
        return True
    return work.wait(timeout)


def pad_to(input_ids: torch.Tensor, width: int) -> torch.Tensor:
    """``input_ids`` (B, T) padded on the right to ``width`` tokens with id 0: any id does, attention being
    causal, tokens past a row's end never reach its own positions, and ``cut_to`` drops what they make."""
    return torch.nn.functional.pad(input_ids, (0, width - input_ids.shape[1]), value=0)


def cut_to(out: TeacherOutput, width: int) -> TeacherOutput:
    """The teacher's output for the first ``width`` positions: what a micro-batch ``pad_to`` widened makes."""
    cut = lambda x: None if x is None else x[:, :width].contiguous()  # no copy when nothing was padded
    return TeacherOutput(None if out.taps is None else [cut(t) for t in out.taps], cut(out.logits),
                         cut(out.topk_index))


class PipelineGroup:
    """The P consecutive ranks that hold one teacher pipeline, and everything they send each other:
    group rank ``stage`` holds pipeline stage ``stage``.  Every wait is bounded (the collective timeout)
    and a failure names what this stage was waiting for."""

    def __init__(self, layout: PipelineLayout, timeout_minutes: float):
        self.layout = layout
        self.timeout = datetime.timedelta(minutes=timeout_minutes)
        world, stages = distributed.world_size(), layout.stages
        check_pipeline_world(stages, world)
        self.index, self.stage = divmod(distributed.rank(), stages)
        self.members = [self.index * stages + i for i in range(stages)]
        self.groups = [dist.new_group([g * stages + i for i in range(stages)], timeout=self.timeout)
                       for g in range(world // stages)]  # every rank creates every group, in order
        self.group = self.groups[self.index]

    def wait(self, work, what: str):
        try:
            if not wait_for(work, dist.get_backend(self.group), self.timeout):
                raise RuntimeError("timed out")
        except RuntimeError as e:
            raise DistributedError(f"pipeline teacher, stage {self.stage} (rank {distributed.rank()}): {what} "
                                   f"failed — a peer stage died, timed out or disagreed on shapes "
                                   f"({str(e).splitlines()[0][:160]})") from None

    def check_agrees(self, device: torch.device) -> None:
        """Every member must have built the same pipeline, or the schedule would hang."""
        mine = torch.tensor(list(self.layout.fingerprint()), dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(mine) for _ in self.members]
        self.wait(dist.all_gather(gathered, mine, group=self.group, async_op=True), "layout handshake")
        bad = [self.members[i] for i, g in enumerate(gathered) if not torch.equal(g, mine)]
        if bad:
            raise DistributedError(f"pipeline group {self.members}: ranks {bad} built a different teacher pipeline "
                                   "(stages, layers, taps, filters or logits options differ); check their configs")

    def gather_ids(self, input_ids: torch.Tensor) -> list[list[torch.Tensor]]:
        """Every member's micro-batch, cut into chunks: each stage runs them all.  Widths may differ (across
        tokenizers each rank's teacher reads its own tokens): all are padded to the widest (``pad_to``)."""
        shape = torch.tensor(list(input_ids.shape), dtype=torch.int64, device=input_ids.device)
        shapes = [torch.zeros_like(shape) for _ in self.members]
        self.wait(dist.all_gather(shapes, shape, group=self.group, async_op=True), "shape exchange")
        if any(s[0] != shape[0] for s in shapes):
            raise DistributedError(f"pipeline group {self.members}: micro-batch sizes differ "
                                   f"({[tuple(s.tolist()) for s in shapes]}); every rank needs the same batch size")
        padded = pad_to(input_ids, int(max(s[1] for s in shapes)))
        all_ids = [torch.zeros_like(padded) for _ in self.members]
        self.wait(dist.all_gather(all_ids, padded.contiguous(), group=self.group, async_op=True), "token exchange")
        return [list(torch.tensor_split(ids, self.layout.chunks)) for ids in all_ids]

    def exchange(self, tick: int, transfers: list[Transfer], made: Made, received: Received,
                 chunk_ids: list) -> torch.Tensor | None:
        """Post this tick's sends and receives as one batch, in the call's one order, and wait for
        them all; returns the activations received for the next tick (None: none)."""
        ops, whats, hidden = [], [], None
        for t in transfers:
            m = t.message
            if t.sender == self.stage:
                self._check_sent(t, made[m], chunk_ids[m.owner][m.chunk].shape)
                ops.append(dist.P2POp(dist.isend, made[m], self.members[t.receiver], self.group))
                whats.append(f"sending {self._name(m)} to stage {t.receiver}")
                continue
            buffer = received.get(m)
            if buffer is None:  # activations, for this stage's next tick
                shape, dtype = buffer_shape(self.layout, m, *chunk_ids[m.owner][m.chunk].shape)
                buffer = hidden = torch.empty(shape, dtype=dtype, device=chunk_ids[m.owner][m.chunk].device)
            ops.append(dist.P2POp(dist.irecv, buffer, self.members[t.sender], self.group))
            whats.append(f"receiving {self._name(m)} from stage {t.sender}")
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # NCCL: one work for the whole batch
            whats = ["; ".join(whats)]
        for work, what in zip(works, whats):
            self.wait(work, f"tick {tick}: {what}")
        return hidden

    def _check_sent(self, t: Transfer, tensor: torch.Tensor, chunk_shape) -> None:
        """The receiver posts a buffer of ``buffer_shape``; NCCL checks no byte counts, so a tensor of
        another shape or dtype would land silently wrong (or hang): refused on the sender, before it goes."""
        shape, dtype = buffer_shape(self.layout, t.message, *chunk_shape)
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise DistributedError(f"pipeline teacher, stage {self.stage}: {self._name(t.message)} is "
                                   f"{tuple(tensor.shape)} {tensor.dtype}, stage {t.receiver} expects {tuple(shape)} "
                                   f"{dtype}")

    def _name(self, m: Message) -> str:
        kind = f"tap {self.layout.tap_layers[m.tap]}" if m.kind == MessageKind.TAP else m.kind.name.lower()
        return f"{kind} of chunk {m.chunk} of stage {m.owner}"


class PipelineTeacher:
    """Each rank of a ``PipelineGroup`` of P ranks holds one pipeline stage.  A call (every rank of the
    group, each with its own micro-batch) runs the group's P micro-batches, C chunks each, through the
    stages (bubble (P-1)/(P·C + P-1)); each stage sends its filtered taps, and the last the logits,
    straight to the rank that owns the chunk.  Teacher weights never travel."""

    placement = "pipeline"

    def __init__(self, layout: PipelineLayout, path: str, config, filters: FilterBank | None,
                 timeout_minutes: float):
        self.layout = layout
        self.comm = PipelineGroup(layout, timeout_minutes)
        self.stage = self.comm.stage
        start, end = layout.blocks[self.stage]
        self.first, self.last = self.stage == 0, self.stage == layout.stages - 1
        self.device = distributed.device()
        self.model, self.injected = build_stage_model(path, config, start, end, self.first, self.last, layout.dtype,
                                                      self.device)
        self.local_taps = layout.taps_of(self.stage)
        self.recorder = TapRecorder(self.model, [layout.tap_layers[i] for i in self.local_taps]) \
            if self.local_taps else None
        if not self.last:
            stop_after(decoder_layers(self.model)[end - 1])
        self.filters = None
        if filters is not None:
            self.filters = torch.nn.ModuleList(filters.filters[i] for i in self.local_taps).to(self.device,
                                                                                               layout.dtype).eval()
            self.filters.requires_grad_(False)
        self.posts = posts(layout, self.stage)
        self.comm.check_agrees(self.device)
        self.stats = {"calls": 0, "busy_s": 0.0, "wall_s": 0.0}  # for the bubble fraction (benchmarks)
        self.timed = False  # benchmarks set it: the stats' timers then wait for the device (a sync per chunk)

    def local_parameters(self) -> int:
        n = sum(p.numel() for p in self.model.parameters() if not p.is_meta)
        return n + (sum(p.numel() for p in self.filters.parameters()) if self.filters is not None else 0)

    def _clock(self) -> float:
        """Seconds for the stats; when ``timed``, after the device has run what was queued (at no other
        time: a sync per chunk would slow every training step)."""
        if self.timed:
            distributed.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------------- one call
    @torch.no_grad()
    @record_function("teacher")  # names the frozen side's work in a profile (bench/profile_bench.py)
    def __call__(self, input_ids: torch.Tensor) -> TeacherOutput:
        start = self._clock()
        out = self._call(input_ids)
        self.stats["calls"] += 1
        self.stats["wall_s"] += self._clock() - start
        return out

    def _call(self, input_ids: torch.Tensor) -> TeacherOutput:
        chunk_ids = self.comm.gather_ids(input_ids.to(self.device))
        received = self._buffers(chunk_ids[self.stage])
        hidden = None
        for tick, transfers in enumerate(self.posts):
            made = self._run_tick(tick, chunk_ids, hidden, received)
            hidden = self.comm.exchange(tick, transfers, made, received, chunk_ids)
        return cut_to(self._assemble(received), input_ids.shape[1])

    def _buffers(self, my_chunks: list[torch.Tensor]) -> Received:
        """A buffer for everything this rank's chunks get back: the call's output."""
        received: Received = {}
        for m in returned_to(self.layout, self.stage):
            shape, dtype = buffer_shape(self.layout, m, *my_chunks[m.chunk].shape)
            received[m] = torch.empty(shape, dtype=dtype, device=self.device)
        return received

    def _run_tick(self, tick: int, chunk_ids: list, hidden: torch.Tensor | None, received: Received) -> Made:
        """Run this tick's chunk (none in the bubble) on the ``hidden`` state received last tick; what
        it makes for this rank lands in ``received``, the rest is returned for sending."""
        at = chunk_at(self.layout, self.stage, tick)
        if at is None:
            return {}
        self.injected.hidden = hidden
        busy = self._clock()
        tensors = self._forward(*at, chunk_ids[at[0]][at[1]])
        self.stats["busy_s"] += self._clock() - busy
        made: Made = {}
        for m, tensor in tensors.items():
            if m.kind != MessageKind.ACTIVATIONS and m.owner == self.stage:
                received[m].copy_(tensor)
            else:
                made[m] = tensor.contiguous()
        return made

    def _forward(self, owner: int, c: int, ids: torch.Tensor) -> Made:
        """This stage's forward of one chunk: each message it makes of it (``made_by``), as a tensor."""
        layout = self.layout
        logits, out = run_pipeline_stage(self.model, ids, layout.documents)
        taps = {}
        if self.recorder is not None:
            states = self.recorder.take()
            if self.filters is not None:
                states = [f(h) for f, h in zip(self.filters, states)]
            taps = {i: state.float() for i, state in zip(self.local_taps, states)}
        values = index = None
        if logits is not None and layout.need_logits:
            values, index = teacher_logits(logits, layout.vocab, layout.logits_topk, layout.logits_dtype,
                                           layout.tail_temperature, layout.top_p)
            values = values.to(layout.logits_dtype)
        by_kind = {MessageKind.ACTIVATIONS: out, MessageKind.LOGITS: values, MessageKind.TOPK_IDS: index}
        return {m: taps[m.tap] if m.kind == MessageKind.TAP else by_kind[m.kind]
                for m in made_by(layout, self.stage, owner, c)}

    def _assemble(self, received: Received) -> TeacherOutput:
        """This rank's micro-batch: its chunks' messages joined back together."""
        layout, me = self.layout, self.stage
        joined = lambda kind, tap=0: torch.cat([received[Message(me, c, kind, tap)] for c in range(layout.chunks)])
        taps = [joined(MessageKind.TAP, i) for i in range(len(layout.tap_layers))]
        logits = index = None
        if layout.need_logits:
            logits = joined(MessageKind.LOGITS).float()
            if layout.logits_topk:
                index = joined(MessageKind.TOPK_IDS)
        return TeacherOutput(taps or None, logits, index)


def build_pipeline_teacher(cfg, tap_layers: list[int], filters, need_logits: bool, dtype: torch.dtype,
                           document_eos: int | None = None, vocab: int | None = None) -> PipelineTeacher:
    t = cfg.teacher
    config = teacher_hf_config(t)
    layout = PipelineLayout.resolve(
        config, tap_layers, filters, stages=t.pipeline_stages, explicit_layers=t.pipeline_layers,
        chunks=t.pipeline_chunks, need_logits=need_logits, logits_topk=t.logits_topk,
        logits_dtype=LOGITS_DTYPES[t.logits_dtype], dtype=dtype,
        document_eos=document_eos, vocab=vocab, tail_temperature=cfg.tail_temperature, top_p=top_p_of(cfg))
    return PipelineTeacher(layout, t.path, config, filters, cfg.train.timeout_minutes)
