"""The pipeline teacher's forward-only schedule, in plain ``torch.distributed`` point-to-point calls:
DeepSpeed's PipelineEngine returns only last-stage outputs, sets global state that breaks a ZeRO-3
engine created afterwards, and hangs on a tuple mismatch.  Every receive is posted before the
schedule starts and every send is non-blocking, so the fixed order cannot deadlock; every wait has
the run's timeout and fails with an error naming the pipeline stage, not a hang."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from ted_ds import distributed
from ted_ds.architectures import decoder_layers, load_hf_config
from ted_ds.errors import ConfigError, DistributedError
from ted_ds.filters import FilterBank
from ted_ds.pipeline.layout import PipelineLayout
from ted_ds.pipeline.messages import Message, MessageKind, TagAllocator
from ted_ds.pipeline.stage import build_stage_model, run_pipeline_stage, stop_after
from ted_ds.taps import TapRecorder
from ted_ds.teacher import LOGITS_DTYPES, TeacherOutput, teacher_logits

Received = dict[Message, torch.Tensor]  # this rank's buffer for each message it gets (or makes itself)
Pending = list[tuple]  # (work, what) of every send and receive still in flight


class PipelineTeacher:
    """Group rank ``s`` of each group of P consecutive ranks holds pipeline stage ``s``.  A call (every
    rank of the group, each with its own micro-batch) runs the group's P micro-batches, C chunks each,
    through the stages (bubble (P-1)/(P·C + P-1)); each stage sends its filtered taps, and the last
    the logits, straight to the rank that owns the chunk.  Teacher weights never travel."""

    placement = "pipeline"

    def __init__(self, layout: PipelineLayout, path: str, config, filters: FilterBank | None,
                 timeout_minutes: float):
        self.layout = layout
        self.timeout = datetime.timedelta(minutes=timeout_minutes)
        self._join_groups()
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
        self.tags = TagAllocator(layout.stages, layout.chunks, len(layout.tap_layers))
        self._check_group_agrees()
        self.stats = {"calls": 0, "busy_s": 0.0, "wall_s": 0.0}  # for the bubble fraction (benchmarks)

    def _join_groups(self) -> None:
        """``stage``: this rank's pipeline stage; ``members``: the ranks of its group, by stage."""
        world, stages = distributed.world_size(), self.layout.stages
        if world % stages:
            raise ConfigError(f"teacher.pipeline_stages {stages} must divide the number of ranks {world}")
        self.group_index, self.stage = divmod(distributed.rank(), stages)
        self.members = [self.group_index * stages + i for i in range(stages)]
        self.groups = [dist.new_group([g * stages + i for i in range(stages)], timeout=self.timeout)
                       for g in range(world // stages)]  # every rank creates every group, in order
        self.group = self.groups[self.group_index]

    def _check_group_agrees(self) -> None:
        """Every member must have built the same pipeline, or the schedule would hang."""
        mine = torch.tensor(list(self.layout.fingerprint()), dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in self.members]
        self._wait(dist.all_gather(gathered, mine, group=self.group, async_op=True), "layout handshake")
        bad = [self.members[i] for i, g in enumerate(gathered) if not torch.equal(g, mine)]
        if bad:
            raise DistributedError(f"pipeline group {self.members}: ranks {bad} built a different teacher pipeline "
                                   "(stages, layers, taps, filters or logits options differ); check their configs")

    def local_parameters(self) -> int:
        n = sum(p.numel() for p in self.model.parameters() if not p.is_meta)
        return n + (sum(p.numel() for p in self.filters.parameters()) if self.filters is not None else 0)

    # ------------------------------------------------------------------------- communication
    def _wait(self, work, what: str):
        try:
            if not work.wait(self.timeout):
                raise RuntimeError("timed out")
        except RuntimeError as e:
            raise DistributedError(f"pipeline teacher, stage {self.stage} (rank {distributed.rank()}): {what} "
                                   f"failed — a peer stage died, timed out or disagreed on shapes "
                                   f"({str(e).splitlines()[0][:160]})") from None

    def _expect(self, m: Message, shape: tuple, dtype: torch.dtype, sender: int, received: Received,
                pending: Pending, what: str) -> None:
        """A buffer for message ``m``, and its receive unless this rank makes it itself."""
        received[m] = buf = torch.empty(shape, dtype=dtype, device=self.device)
        if sender != self.stage:
            pending.append((dist.irecv(buf, self.members[sender], tag=self.tags.tag(m)), what))

    def _deliver(self, m: Message, tensor: torch.Tensor, received: Received, pending: Pending, what: str) -> None:
        if m.owner == self.stage:
            received[m].copy_(tensor)
        else:
            pending.append((dist.isend(tensor.contiguous(), self.members[m.owner], tag=self.tags.tag(m)), what))

    # ------------------------------------------------------------------------- one call
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> TeacherOutput:
        start = time.perf_counter()
        out = self._call(input_ids)
        self.stats["calls"] += 1
        self.stats["wall_s"] += time.perf_counter() - start
        return out

    def _call(self, input_ids: torch.Tensor) -> TeacherOutput:
        input_ids = input_ids.to(self.device)
        shape = torch.tensor(list(input_ids.shape), dtype=torch.int64, device=self.device)
        shapes = [torch.zeros_like(shape) for _ in self.members]
        self._wait(dist.all_gather(shapes, shape, group=self.group, async_op=True), "shape exchange")
        if any(not torch.equal(s, shape) for s in shapes):
            raise DistributedError(f"pipeline group {self.members}: micro-batch shapes differ "
                                   f"({[tuple(s.tolist()) for s in shapes]}); every rank needs the same batch shape")
        all_ids = [torch.zeros_like(input_ids) for _ in self.members]
        self._wait(dist.all_gather(all_ids, input_ids.contiguous(), group=self.group, async_op=True), "token exchange")
        chunk_ids = [list(torch.tensor_split(ids, self.layout.chunks)) for ids in all_ids]
        received, pending = self._post_receives(chunk_ids[self.stage])
        for owner in range(self.layout.stages):
            for c, ids in enumerate(chunk_ids[owner]):
                self._run_chunk(owner, c, ids, received, pending)
        for work, what in pending:
            self._wait(work, what)
        return self._assemble(received)

    def _post_receives(self, my_chunks: list[torch.Tensor]) -> tuple[Received, Pending]:
        """Buffers (and irecvs) for everything this rank's chunks get back."""
        layout, me, last = self.layout, self.stage, self.layout.stages - 1
        received: Received = {}
        pending: Pending = []
        for c, ids in enumerate(my_chunks):
            b, t = ids.shape
            for i, layer in enumerate(layout.tap_layers):
                s = layout.stage_of_layer(layer)
                self._expect(Message(me, c, MessageKind.TAP, i), (b, t, layout.filter_dim), torch.float32, s,
                             received, pending, f"receiving tap {layer} from stage {s}")
            if layout.need_logits:
                k = layout.logits_topk
                self._expect(Message(me, c, MessageKind.LOGITS), (b, t, k or layout.vocab), layout.logits_dtype,
                             last, received, pending, "receiving logits from the last stage")
                if k:
                    self._expect(Message(me, c, MessageKind.TOPK_IDS), (b, t, k), torch.int64, last, received,
                                 pending, "receiving top-k ids from the last stage")
        return received, pending

    def _run_chunk(self, owner: int, c: int, ids: torch.Tensor, received: Received, pending: Pending) -> None:
        layout = self.layout
        activations = Message(owner, c, MessageKind.ACTIVATIONS)
        if not self.first:
            hidden = torch.empty(*ids.shape, layout.hidden_size, dtype=layout.dtype, device=self.device)
            self._wait(dist.irecv(hidden, self.members[self.stage - 1], tag=self.tags.tag(activations)),
                       f"receiving activations from stage {self.stage - 1}")
            self.injected.hidden = hidden
        busy = time.perf_counter()
        logits, out = run_pipeline_stage(self.model, ids, layout.documents)
        self.stats["busy_s"] += time.perf_counter() - busy
        if self.recorder is not None:
            states = self.recorder.take()
            if self.filters is not None:
                states = [f(h) for f, h in zip(self.filters, states)]
            for i, state in zip(self.local_taps, states):
                self._deliver(Message(owner, c, MessageKind.TAP, i), state.float(), received, pending,
                              f"sending tap {layout.tap_layers[i]}")
        if not self.last:
            pending.append((dist.isend(out.contiguous(), self.members[self.stage + 1], tag=self.tags.tag(activations)),
                            f"sending activations to stage {self.stage + 1}"))
        elif layout.need_logits:
            values, index = teacher_logits(logits, layout.vocab, layout.logits_topk, layout.logits_dtype)
            self._deliver(Message(owner, c, MessageKind.LOGITS), values.to(layout.logits_dtype), received, pending,
                          "sending logits")
            if index is not None:
                self._deliver(Message(owner, c, MessageKind.TOPK_IDS), index, received, pending, "sending top-k ids")

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
    config = load_hf_config(t.path, t.trust_remote_code)
    layout = PipelineLayout.resolve(
        config, tap_layers, filters, stages=t.pipeline_stages, explicit_layers=t.pipeline_layers,
        chunks=t.pipeline_chunks, need_logits=need_logits, logits_topk=t.logits_topk,
        logits_dtype=LOGITS_DTYPES[t.logits_dtype], dtype=dtype,
        document_eos=document_eos, vocab=vocab)
    return PipelineTeacher(layout, t.path, config, filters, cfg.train.timeout_minutes)
