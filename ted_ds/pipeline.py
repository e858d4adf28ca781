"""A pipeline-parallel frozen teacher that hands every rank the filtered states of its own batch.

Layout: W ranks form W/P pipeline groups of P consecutive ranks; group rank ``s`` holds stage
``s``: a contiguous run of teacher blocks (stage 0 also the embeddings, stage P-1 the final norm
and head) and the teacher filters of the taps inside its blocks — about 1/P of the teacher.  Each
rank reads only its stage's tensors from the teacher's safetensors.  The teacher's layout is its
own: the student stays ZeRO-3 data-parallel over all W ranks.

One call (every rank of a group calls it with its own micro-batch, as the trainer does):

1. the group all-gathers the micro-batches' shapes (a mismatch is an error) and token ids;
2. the P micro-batches, each cut into ``pipeline_chunks`` chunks, flow through the stages in one
   fixed order (a forward-only GPipe schedule: bubble (P-1)/(P·C + P-1) for C chunks per rank);
3. a stage applies its filters to its tapped blocks and sends the filtered states straight to the
   rank that owns the chunk; the last stage sends the logits (fp32 or bf16, optionally only the
   top-k values and ids).  Teacher weights never travel.

Sends are non-blocking and every receive a rank expects is posted before the schedule starts, so
the fixed order cannot deadlock; every wait has the run's timeout and fails with an error naming
the stage, not a hang.  The schedule is written with plain ``torch.distributed`` point-to-point
calls rather than DeepSpeed's PipelineEngine, which only returns last-stage outputs, sets global
state that breaks a ZeRO-3 engine created afterwards, and hangs on a tuple mismatch.
"""

from __future__ import annotations

import datetime
import hashlib
import time

import torch
import torch.distributed as dist
from torch import nn

from ted_ds import distributed
from ted_ds.architectures import (
    decoder_layers,
    final_norm,
    hidden_size,
    layout,
    load_hf_config,
    meta_model,
    module_name,
    num_layers,
    vocab_size,
)
from ted_ds.documents import for_model, forward_kwargs
from ted_ds.errors import ConfigError, DistributedError
from ted_ds.filters import FilterBank
from ted_ds.taps import TapRecorder
from ted_ds.teacher import TeacherOutput, topk_logits
from ted_ds.weights import WeightReader, fill_modules


# ----------------------------------------------------------------------------- partitioning
def balanced_partition(costs: list[int], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty runs minimising the largest run's sum;
    returns the run lengths."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ConfigError(f"cannot split {n} layers into {parts} pipeline stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[p][i]: first i layers in p parts
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                load = max(best[p - 1][j], prefix[i] - prefix[j])
                if load < best[p][i]:
                    best[p][i], cut[p][i] = load, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        sizes.append(i - cut[p][i])
        i = cut[p][i]
    return sizes[::-1]


def stage_layout(config, stages: int, explicit: list[int] | None) -> list[tuple[int, int]]:
    """[start, end) block ranges per stage: explicit sizes, or balanced by parameter count with the
    embeddings counted on stage 0 and the head on the last stage."""
    n = num_layers(config)
    if explicit is not None:
        if len(explicit) != stages or sum(explicit) != n or min(explicit) < 1:
            raise ConfigError(f"teacher.pipeline_layers {explicit} must be {stages} positive counts summing to "
                              f"the teacher's {n} layers")
        sizes = explicit
    else:
        meta = meta_model(config)
        blocks = [sum(p.numel() for p in b.parameters()) for b in decoder_layers(meta)]
        embed = vocab_size(config) * hidden_size(config)
        # stage 0 also embeds and the last stage also projects to the vocabulary: weigh them in
        costs = list(blocks)
        costs[0] += embed
        costs[-1] += embed
        sizes = balanced_partition(costs, stages)
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


# ----------------------------------------------------------------------------- the stage module
class _StageDone(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


class PassThrough(nn.Module):
    """Stands in for a block another stage owns."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class Injected(nn.Module):
    """Stands in for the input embedding on stages > 0: returns the hidden state received."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, input_ids):
        return self.hidden


class ZeroEmbedding(nn.Module):
    """Stands in for extra embeddings (GPT-2's positions) on stages > 0: adds nothing."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.zero = nn.Buffer(torch.zeros((), dtype=dtype, device=device), persistent=False)

    def forward(self, ids):
        return self.zero


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def build_stage_model(path: str, config, start: int, end: int, first: bool, last: bool, dtype: torch.dtype,
                      device: torch.device) -> tuple[nn.Module, Injected]:
    """The teacher's module tree with only blocks [start, end) (and embeddings / norm + head where
    this stage needs them) given storage and weights in ``dtype`` on ``device``; everything else is
    a stand-in or stays on the meta device, never executed."""
    model = meta_model(config)
    blocks_path, norm_path = layout(model)
    blocks = decoder_layers(model)
    embed_name = module_name(model, model.get_input_embeddings())
    local = {f"{blocks_path}.{i}": blocks[i] for i in range(start, end)}
    extra_embeddings = {name: m for name, m in model.named_modules()
                        if isinstance(m, nn.Embedding) and name != embed_name and not name.startswith(blocks_path)}
    if first:
        local[embed_name] = model.get_input_embeddings()
        local.update(extra_embeddings)
    if last:
        local[norm_path] = final_norm(model)
        local[module_name(model, model.get_output_embeddings())] = model.get_output_embeddings()
    fill_modules(model, local, WeightReader(path), dtype, device)
    for i in list(range(0, start)) + list(range(end, len(blocks))):
        blocks[i] = PassThrough()
    injected = Injected()
    if not first:
        _set_module(model, embed_name, injected)
        for name in extra_embeddings:
            _set_module(model, name, ZeroEmbedding(dtype, device))
    _rebuild_meta_buffers(model, config, device)
    return model.eval().requires_grad_(False), injected


def _stop_after(block: nn.Module) -> None:
    """End the forward at this block (register after any tap hook on it, which must run first)."""
    def stop(_module, _inputs, output):
        raise _StageDone(output[0] if isinstance(output, tuple) else output)

    block.register_forward_hook(stop)


def _rebuild_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Parameter-free helpers with computed buffers (rotary embeddings) are rebuilt for real."""
    for name, module in list(model.named_modules()):
        if name and not any(True for _ in module.parameters(recurse=False)) and any(
                b.is_meta for b in module.buffers(recurse=False)):
            try:
                _set_module(model, name, type(module)(config=config).to(device))
            except TypeError as e:
                raise ConfigError(f"pipeline placement cannot rebuild {type(module).__name__} of this architecture "
                                  f"({e}); use teacher.placement replicated or zero3") from None


# ----------------------------------------------------------------------------- the teacher
class PipelineTeacher:
    placement = "pipeline"

    def __init__(self, path: str, config, tap_layers: list[int], filters: FilterBank | None, need_logits: bool,
                 stages: int, explicit_layers: list[int] | None, chunks: int, logits_dtype: torch.dtype,
                 logits_topk: int, timeout_minutes: float, dtype: torch.dtype = torch.float32,
                 document_eos: int | None = None, vocab: int | None = None):
        world, rank = distributed.world_size(), distributed.rank()
        if world % stages:
            raise ConfigError(f"teacher.pipeline_stages {stages} must divide the number of ranks {world}")
        self.P, self.chunks, self.need_logits, self.topk = stages, chunks, need_logits, logits_topk
        self.logits_dtype = logits_dtype
        self.timeout = datetime.timedelta(minutes=timeout_minutes)
        self.group_index, self.stage = divmod(rank, stages)
        self.members = [self.group_index * stages + i for i in range(stages)]
        self.groups = [dist.new_group([g * stages + i for i in range(stages)], timeout=self.timeout)
                       for g in range(world // stages)]  # every rank creates every group, in order
        self.group = self.groups[self.group_index]
        self.layout = stage_layout(config, stages, explicit_layers)
        start, end = self.layout[self.stage]
        self.first, self.last = self.stage == 0, self.stage == stages - 1
        self.device = distributed.device()
        self.model, self.injected = build_stage_model(path, config, start, end, self.first, self.last, dtype,
                                                      self.device)
        # logits keep the tokenizer's ids only: a head padded past them drops its extra rows
        self.hidden_size, self.dtype = hidden_size(config), dtype
        self.vocab = min(vocab, vocab_size(config)) if vocab else vocab_size(config)
        # every stage recomputes the positions and mask from the chunk's token ids, which it holds
        self.documents = for_model(self.model, document_eos, dtype)
        # taps: global order, which stage holds each, and the local filters
        self.tap_layers = list(tap_layers)
        self.tap_stage = [self._stage_of_layer(layer) for layer in self.tap_layers]
        self.local_taps = [i for i, s in enumerate(self.tap_stage) if s == self.stage]
        self.recorder = TapRecorder(self.model, [self.tap_layers[i] for i in self.local_taps]) \
            if self.local_taps else None
        if not self.last:
            _stop_after(decoder_layers(self.model)[end - 1])
        self.filters = None
        self.filter_dim = self.hidden_size
        if filters is not None:
            self.filter_dim = filters.out_dim
            self.filters = nn.ModuleList(filters.filters[i] for i in self.local_taps).to(self.device, dtype).eval()
            self.filters.requires_grad_(False)
        self._check_group_agrees()
        self.stats = {"calls": 0, "busy_s": 0.0, "wall_s": 0.0}  # for the bubble fraction (benchmarks)

    def _stage_of_layer(self, layer: int) -> int:
        for s, (a, b) in enumerate(self.layout):
            if a < layer <= b:
                return s
        raise ConfigError(f"tap layer {layer} is outside the teacher's layers")

    def _check_group_agrees(self) -> None:
        """Every member must have built the same pipeline, or the schedule would hang."""
        fingerprint = repr((self.P, self.layout, self.tap_layers, self.filter_dim, self.vocab, self.topk,
                            str(self.logits_dtype), self.chunks, self.need_logits, self.documents)).encode()
        mine = torch.tensor(list(hashlib.sha256(fingerprint).digest()[:8]), dtype=torch.int64, device=self.device)
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

    def _tag(self, owner: int, chunk: int, kind: int) -> int:
        return (owner * self.chunks + chunk) * 64 + kind  # kind: 0 activations, 1 logits, 2 top-k ids, 3+ taps

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
        chunk_ids = [list(torch.tensor_split(ids, self.chunks)) for ids in all_ids]
        me = self.stage
        received, pending = self._post_receives(chunk_ids[me])
        for owner in range(self.P):
            for c, ids in enumerate(chunk_ids[owner]):
                self._run_chunk(owner, c, ids, received, pending)
        for work, what in pending:
            self._wait(work, what)
        return self._assemble(received)

    def _post_receives(self, my_chunks: list[torch.Tensor]):
        """Buffers (and irecvs) for everything other stages will send this rank."""
        received: dict[tuple, torch.Tensor] = {}
        pending = []
        me = self.stage
        for c, ids in enumerate(my_chunks):
            b, t = ids.shape
            for i, s in enumerate(self.tap_stage):
                received[("tap", c, i)] = buf = torch.empty(b, t, self.filter_dim, dtype=torch.float32,
                                                            device=self.device)
                if s != me:
                    pending.append((dist.irecv(buf, self.members[s], tag=self._tag(me, c, 3 + i)),
                                    f"receiving tap {self.tap_layers[i]} from stage {s}"))
            if self.need_logits:
                width = self.topk or self.vocab
                received[("logits", c)] = buf = torch.empty(b, t, width, dtype=self.logits_dtype, device=self.device)
                if not self.last:
                    pending.append((dist.irecv(buf, self.members[-1], tag=self._tag(me, c, 1)),
                                    "receiving logits from the last stage"))
                if self.topk:
                    received[("index", c)] = idx = torch.empty(b, t, self.topk, dtype=torch.int64, device=self.device)
                    if not self.last:
                        pending.append((dist.irecv(idx, self.members[-1], tag=self._tag(me, c, 2)),
                                        "receiving top-k ids from the last stage"))
        return received, pending

    def _deliver(self, owner: int, key: tuple, tensor: torch.Tensor, tag: int, received, pending, what: str):
        if owner == self.stage:
            received[key].copy_(tensor)
        else:
            pending.append((dist.isend(tensor.contiguous(), self.members[owner], tag=tag), what))

    def _run_chunk(self, owner: int, c: int, ids: torch.Tensor, received, pending) -> None:
        b, t = ids.shape
        if not self.first:
            hidden = torch.empty(b, t, self.hidden_size, dtype=self.dtype, device=self.device)
            self._wait(dist.irecv(hidden, self.members[self.stage - 1], tag=self._tag(owner, c, 0)),
                       f"receiving activations from stage {self.stage - 1}")
            self.injected.hidden = hidden
        logits = None
        busy = time.perf_counter()
        try:
            logits = self.model(input_ids=ids, use_cache=False, **forward_kwargs(self.documents, ids)).logits
            out = None
        except _StageDone as done:
            out = done.hidden
        self.stats["busy_s"] += time.perf_counter() - busy
        if self.recorder is not None:
            states = self.recorder.take()
            if self.filters is not None:
                states = [f(h) for f, h in zip(self.filters, states)]
            for i, state in zip(self.local_taps, states):
                self._deliver(owner, ("tap", c, i), state.float(), self._tag(owner, c, 3 + i), received, pending,
                              f"sending tap {self.tap_layers[i]}")
        if not self.last:
            pending.append((dist.isend(out.contiguous(), self.members[self.stage + 1], tag=self._tag(owner, c, 0)),
                            f"sending activations to stage {self.stage + 1}"))
        elif self.need_logits:
            values, index = topk_logits(logits[..., :self.vocab], self.topk)
            self._deliver(owner, ("logits", c), values.to(self.logits_dtype), self._tag(owner, c, 1), received,
                          pending, "sending logits")
            if index is not None:
                self._deliver(owner, ("index", c), index, self._tag(owner, c, 2), received, pending,
                              "sending top-k ids")

    def _assemble(self, received) -> TeacherOutput:
        taps = [torch.cat([received[("tap", c, i)] for c in range(self.chunks)]) for i in range(len(self.tap_layers))]
        logits = index = None
        if self.need_logits:
            logits = torch.cat([received[("logits", c)] for c in range(self.chunks)]).float()
            if self.topk:
                index = torch.cat([received[("index", c)] for c in range(self.chunks)])
        return TeacherOutput(taps or None, logits, index)


def build_pipeline_teacher(cfg, tap_layers: list[int], filters, need_logits: bool, dtype: torch.dtype,
                           document_eos: int | None = None, vocab: int | None = None):
    t = cfg.teacher
    config = load_hf_config(t.path, t.trust_remote_code)
    logits_dtype = torch.bfloat16 if t.logits_dtype == "bf16" else torch.float32
    return PipelineTeacher(t.path, config, tap_layers, filters, need_logits, t.pipeline_stages, t.pipeline_layers,
                           t.pipeline_chunks, logits_dtype, t.logits_topk, cfg.train.timeout_minutes, dtype,
                           document_eos, vocab)
