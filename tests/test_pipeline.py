"""The pipeline teacher's bookkeeping, without processes: the order of a call's messages, simulated
under NCCL's matching rules, and the layout handshake."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from ted_ds.documents import DocumentAttention
from ted_ds.errors import ConfigError
from ted_ds.pipeline.layout import PipelineLayout
from ted_ds.pipeline.messages import Message, MessageKind, posts, returned_to, ticks, transfers


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
             documents=DocumentAttention(2, torch.float32, "sdpa"), tail_temperature=2.0)


def test_the_layout_handshake_covers_every_field():
    assert {f.name for f in dataclasses.fields(PipelineLayout)} == set(OTHER)
    assert LAYOUT.fingerprint() == dataclasses.replace(LAYOUT).fingerprint()
    for name, value in OTHER.items():
        assert dataclasses.replace(LAYOUT, **{name: value}).fingerprint() != LAYOUT.fingerprint(), name
    assert [LAYOUT.taps_of(s) for s in range(LAYOUT.stages)] == [[0], [1]]
    with pytest.raises(ConfigError, match="tap layer 5 is outside"):
        dataclasses.replace(LAYOUT, tap_layers=(2, 5))
