"""The pipeline teacher's bookkeeping, without processes: the order of a call's messages, simulated
under NCCL's matching rules, and the layout handshake."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel  # imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR

from ted_ds.documents import DocumentAttention
from ted_ds.errors import ConfigError, DistributedError
from ted_ds.pipeline.layout import PipelineLayout
from ted_ds.pipeline.messages import Message, MessageKind, posts, returned_to, ticks, transfers
from ted_ds.teacher import TopP


def layout_of(stages: int, chunks: int, taps: str, logits: str) -> PipelineLayout:
    """Two blocks per stage; ``taps``: none, the first stage's, the last stage's or every block;
    ``logits``: none, all of them, or top-8."""
    layers = 2 * stages
    tap_layers = {"none": (), "first": (2,), "last": (layers,), "every": tuple(range(1, layers + 1))}[taps]
    return PipelineLayout(blocks=tuple((2 * s, 2 * s + 2) for s in range(stages)), tap_layers=tap_layers,
                          chunks=chunks, hidden_size=8, filter_dim=8, need_logits=logits != "none",
                          logits_topk=8 if logits == "top8" else 0, logits_dtype=torch.float32, vocab=50,
                          dtype=torch.float32, documents=None)


def simulate(layout: PipelineLayout) -> dict[int, list[Message]]:
    """Every stage posts its operations as the schedule does (``posts``) and they run as NCCL
    runs them: each rank's one at a time in posting order, a send only together with the receive its
    peer has at the head of its own queue (no tags).  Fails on a message landing in a buffer meant for
    another, on a stage sending a chunk's output before it has the chunk's activations, and on a
    deadlock; returns what each stage received, in order."""
    queues = {s: [(t.sender == s, t.receiver if t.sender == s else t.sender, t.message)
                  for tick in posts(layout, s) for t in tick] for s in range(layout.stages)}
    heads = dict.fromkeys(queues, 0)
    got = {s: [] for s in queues}
    head = lambda s: queues[s][heads[s]] if heads[s] < len(queues[s]) else None
    moved = True
    while moved:
        moved = False
        for a in queues:
            if head(a) is None or not head(a)[0] or head(head(a)[1]) is None:
                continue
            _, b, m = head(a)
            sends, peer, expected = head(b)
            if sends or peer != a:
                continue  # b is busy with another operation: a waits
            assert expected == m, f"stage {b} receives {m} into the buffer of {expected}"
            assert a == 0 or Message(m.owner, m.chunk, MessageKind.ACTIVATIONS) in got[a], f"stage {a} sends {m} early"
            got[b].append(m)
            heads[a] += 1
            heads[b] += 1
            moved = True
    stuck = {s: head(s) for s in queues if head(s) is not None}
    assert not stuck, f"deadlock: every stage waits on a peer, at {stuck}"
    return got


GRID = list(itertools.product(range(1, 9), range(1, 4), ("none", "first", "last", "every"), ("none", "full", "top8")))


@pytest.mark.parametrize("stages,chunks,taps,logits", GRID)
def test_the_message_order_completes_under_nccl_rules(stages, chunks, taps, logits):
    """P = 1..8, C = 1..3, taps and logits on or off, top-k: posted as the schedule posts them and run
    as NCCL runs them, every message meets the receive meant for it (so the k-th send of a pair meets
    the k-th receive: no tag needed), nothing deadlocks, and each stage gets exactly its chunks'
    taps and logits from the other stages and every chunk's activations from the stage before it."""
    layout = layout_of(stages, chunks, taps, logits)
    got = simulate(layout)
    last = stages - 1
    kinds = [MessageKind.LOGITS] * layout.need_logits + [MessageKind.TOPK_IDS] * bool(layout.logits_topk)
    maker = lambda m: layout.stage_of_layer(layout.tap_layers[m.tap]) if m.kind == MessageKind.TAP else last
    for s in range(stages):
        wanted = [Message(s, c, MessageKind.TAP, i) for c in range(chunks) for i in range(len(layout.tap_layers))]
        wanted += [Message(s, c, kind) for c in range(chunks) for kind in kinds]
        assert sorted(returned_to(layout, s)) == sorted(wanted)
        activations = [Message(o, c, MessageKind.ACTIVATIONS) for o in range(stages) for c in range(chunks)] * (s > 0)
        assert sorted(got[s]) == sorted([m for m in wanted if maker(m) != s] + activations), s


def test_at_most_one_chunk_per_stage_is_in_flight():
    """Each tick a stage sends what it made of one chunk, and the schedule waits for the tick's
    sends: the last stage of P=8, C=3 never holds more than one other owner's logits."""
    layout = layout_of(8, 3, "every", "top8")
    for tick in range(ticks(layout)):
        for s in range(layout.stages):
            sent = {(t.message.owner, t.message.chunk) for t in transfers(layout) if t.tick == tick and t.sender == s}
            assert len(sent) <= 1, (tick, s, sent)


LAYOUT = PipelineLayout(blocks=((0, 2), (2, 4)), tap_layers=(2, 4), chunks=2, hidden_size=64, filter_dim=64,
                        need_logits=True, logits_topk=0, logits_dtype=torch.float32, vocab=500, dtype=torch.float32,
                        documents=None)
OTHER = dict(blocks=((0, 1), (1, 4)), tap_layers=(1, 4), chunks=1, hidden_size=32, filter_dim=32, need_logits=False,
             logits_topk=8, logits_dtype=torch.bfloat16, vocab=499, dtype=torch.bfloat16,
             documents=DocumentAttention(2, torch.float32, "sdpa"), tail_temperature=2.0, top_p=TopP(0.95, 2.0))


def test_the_layout_handshake_covers_every_field():
    assert {f.name for f in dataclasses.fields(PipelineLayout)} == set(OTHER)
    assert LAYOUT.fingerprint() == dataclasses.replace(LAYOUT).fingerprint()
    for name, value in OTHER.items():
        assert dataclasses.replace(LAYOUT, **{name: value}).fingerprint() != LAYOUT.fingerprint(), name
    assert [LAYOUT.taps_of(s) for s in range(LAYOUT.stages)] == [[0], [1]]
    with pytest.raises(ConfigError, match="tap layer 5 is outside"):
        dataclasses.replace(LAYOUT, tap_layers=(2, 5))


class _RecordedWork:
    """A transfer's handle that records how it was waited for."""

    def __init__(self):
        self.waits = []

    def wait(self, *timeout) -> bool:
        self.waits.append(timeout)
        return True


@pytest.mark.parametrize("backend,timed", [("nccl", False), ("gloo", True)])
def test_nccl_transfers_are_waited_for_without_a_timeout_gloo_ones_with_it(backend, timed):
    """NCCL's wait(timeout) would block the CPU on the GPU every tick; its group's timeout bounds the
    plain wait.  gloo's transfers keep the caller's timeout."""
    import datetime

    from ted_ds.pipeline.schedule import wait_for

    work, timeout = _RecordedWork(), datetime.timedelta(seconds=3)
    assert wait_for(work, backend, timeout)
    assert work.waits == [(timeout,) if timed else ()]


class _PostedOp:
    """``dist.P2POp`` as ``exchange`` builds it, kept instead of posted."""

    def __init__(self, op, tensor, peer, group):
        self.op, self.tensor, self.peer = op, tensor, peer


def _group_of(layout: PipelineLayout, stage: int):
    """Stage ``stage``'s ``PipelineGroup`` as its constructor leaves it (group 0: members 0..P-1),
    without a process group."""
    import datetime

    from ted_ds.pipeline.schedule import PipelineGroup

    group = PipelineGroup.__new__(PipelineGroup)
    group.layout, group.stage, group.members, group.group = layout, stage, list(range(layout.stages)), None
    group.timeout = datetime.timedelta(seconds=1)
    return group


def _tick_tensors(layout: PipelineLayout, stage: int, tick_posts):
    """What a stage holds at a tick: every owner's chunk ids, its receive buffers, and what it made."""
    from ted_ds.pipeline.messages import buffer_shape

    chunk_ids = [[torch.zeros(2, 5, dtype=torch.int64)] * layout.chunks for _ in range(layout.stages)]
    tensor = lambda m: torch.zeros(*buffer_shape(layout, m, 2, 5)[0], dtype=buffer_shape(layout, m, 2, 5)[1])
    received = {m: tensor(m) for m in returned_to(layout, stage)}
    made = {t.message: tensor(t.message) for t in tick_posts if t.sender == stage}
    return chunk_ids, received, made


def test_exchange_posts_each_ticks_transfers_in_the_one_order(monkeypatch):
    """What ``exchange`` hands to ``batch_isend_irecv`` (not only what ``posts`` plans): each tick's
    sends and receives in the order both sides share, to the right peer, with the tensor made or the
    buffer meant for that message (P=3, C=2, every tap, top-8 logits)."""
    import torch.distributed as dist

    batches = []
    monkeypatch.setattr(dist, "P2POp", _PostedOp)
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: batches.append(ops) or [])
    layout = layout_of(3, 2, "every", "top8")
    for stage in range(layout.stages):
        group = _group_of(layout, stage)
        for tick, tick_posts in enumerate(posts(layout, stage)):
            chunk_ids, received, made = _tick_tensors(layout, stage, tick_posts)
            batches.clear()
            group.exchange(tick, tick_posts, made, received, chunk_ids)
            ops = batches[0] if batches else []
            assert [(op.op is dist.isend, op.peer) for op in ops] == \
                [(t.sender == stage, t.receiver if t.sender == stage else t.sender) for t in tick_posts]
            for op, t in zip(ops, tick_posts):
                expected = made.get(t.message) if t.sender == stage else received.get(t.message)
                assert expected is None or op.tensor is expected, (stage, tick, t)


def test_a_sent_tensor_that_does_not_fit_the_receivers_buffer_is_refused_before_it_goes(monkeypatch):
    """NCCL checks no byte counts: logits of the wrong dtype (or shape) would land silently wrong."""
    import torch.distributed as dist

    posted = []
    monkeypatch.setattr(dist, "P2POp", _PostedOp)
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: posted.append(ops) or [])
    layout = layout_of(2, 1, "none", "full")
    tick_posts = next(p for p in posts(layout, 1) if any(t.sender == 1 for t in p))
    chunk_ids, received, made = _tick_tensors(layout, 1, tick_posts)
    sent = next(t.message for t in tick_posts if t.sender == 1)
    for bad in (made[sent].to(torch.float16), made[sent][:, :4]):
        with pytest.raises(DistributedError, match=r"pipeline teacher, stage 1: logits of chunk 0 of stage 0 is \(2, "):
            _group_of(layout, 1).exchange(0, tick_posts, {**made, sent: bad}, received, chunk_ids)
    assert not posted


def _matched_as_nccl_checks(rank: int, port: int, outcomes) -> None:
    """One of 2 gloo ranks under the NCCL-matching harness: blocking ``send``/``recv`` with tags that
    NCCL ignores, then rank 0 alone in ``tags_ignored`` (a peer that never posts: a timeout, not a hang)."""
    import datetime
    import os
    import time

    import torch.distributed as dist

    from harness.nccl_matching import matched_as_nccl, tags_ignored

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    with matched_as_nccl():
        if rank == 0:
            dist.send(torch.ones(1), dst=1, tag=7)
            dist.send(torch.full((1,), 2.0), 1, tag=8)
        else:
            first, second = torch.zeros(1), torch.zeros(1)
            outcomes.put(("recv", dist.recv(first, src=0, tag=8), dist.recv(second, 0, tag=7),
                          first.item(), second.item()))
            time.sleep(60)  # alive, posting nothing, until the test ends it
        if rank == 0:
            start = time.time()
            try:
                tags_ignored(datetime.timedelta(seconds=2))
                outcomes.put(("alone", "returned"))
            except RuntimeError as e:
                outcomes.put(("alone", "timed out" if "timed out" in str(e) else str(e)[:200], time.time() - start))
    outcomes.close()
    outcomes.join_thread()
    os._exit(0)  # rank 0's harness thread still waits on its peer


@pytest.mark.multirank
def test_the_nccl_matching_harness_emulates_blocking_recv_and_times_out():
    """``dist.recv(src=...)`` goes through the harness (NCCL order: the first message, whatever its
    tag), and ``tags_ignored`` fails within its timeout when a peer never posts."""
    import torch.multiprocessing as mp

    from ted_ds.distributed import free_port

    outcomes = mp.get_context("spawn").Queue()
    procs = mp.start_processes(_matched_as_nccl_checks, args=(free_port(), outcomes), nprocs=2,
                               start_method="spawn", join=False)
    try:
        seen = {o[0]: o[1:] for o in (outcomes.get(timeout=60) for _ in range(2))}
    finally:
        for p in procs.processes:
            p.kill()
    assert seen["recv"] == (0, 0, 1.0, 2.0), seen
    assert seen["alone"][0] == "timed out" and seen["alone"][1] < 10, seen


def test_a_micro_batch_padded_to_the_groups_widest_gives_its_own_outputs_once_cut_back():
    """Across tokenizers the ranks' teacher widths differ: ``pad_to`` widens a micro-batch, ``cut_to`` cuts the
    teacher's output back, and the kept positions are the unpadded call's (a causal GPT-2, taps and logits)."""
    from ted_ds.pipeline.schedule import cut_to, pad_to
    from ted_ds.teacher import TeacherOutput

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)).eval()
    run = lambda ids: (lambda o: TeacherOutput(list(o.hidden_states[1:]), o.logits))(
        model(ids, output_hidden_states=True))
    ids = torch.randint(40, (2, 7))
    with torch.no_grad():
        want, got = run(ids), cut_to(run(pad_to(ids, 12)), 7)
    assert pad_to(ids, 12).shape == (2, 12) and torch.equal(pad_to(ids, 12)[:, :7], ids)
    assert got.logits.shape == want.logits.shape and torch.allclose(got.logits, want.logits, atol=1e-6)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got.taps, want.taps, strict=True))
