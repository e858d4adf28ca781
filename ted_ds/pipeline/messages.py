"""What pipeline stages send each other, and the one order in which they send it.

NCCL ignores point-to-point tags: between two ranks the k-th send meets the k-th receive posted for
that sender, and a device-bound communicator runs each rank's operations one at a time in posting
order.  So ``transfers`` lists every message of a call once, tick by tick, and both the sending and
the receiving stage post their operations by walking that list: for every pair of stages the sends
and the receives come in the same order, and since every rank's operations follow one global
order, no rank can wait on a peer that waits on it."""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch

from ted_ds.pipeline.layout import PipelineLayout


class MessageKind(IntEnum):
    ACTIVATIONS = 0  # hidden state, pipeline stage s -> s + 1
    LOGITS = 1  # last pipeline stage -> owner: logits, or their top-k values
    TOPK_IDS = 2  # last pipeline stage -> owner: the ids of the top-k values
    TAP = 3  # tapped pipeline stage -> owner: one filtered tap (``Message.tap`` says which)


class Message(NamedTuple):
    """One tensor of one chunk."""

    owner: int  # the pipeline stage whose micro-batch the chunk belongs to
    chunk: int
    kind: MessageKind
    tap: int = 0  # index into the layout's tap_layers (TAP only)


class Transfer(NamedTuple):
    """One message crossing ranks: in ``tick``, pipeline stage ``sender`` sends it to ``receiver``."""

    tick: int
    sender: int
    receiver: int
    message: Message


def ticks(layout: PipelineLayout) -> int:
    """Ticks of a call: P·C chunks through P stages, one chunk per stage per tick."""
    return layout.stages * layout.chunks + layout.stages - 1


def chunk_at(layout: PipelineLayout, stage: int, tick: int) -> tuple[int, int] | None:
    """(owner, chunk) that ``stage`` runs in ``tick``, the owners' chunks in turn; None in the bubble."""
    i = tick - stage
    return divmod(i, layout.chunks) if 0 <= i < layout.stages * layout.chunks else None


def made_by(layout: PipelineLayout, stage: int, owner: int, chunk: int) -> list[Message]:
    """What ``stage`` makes of a chunk, in the order it sends it: its taps, then the activations
    for the next stage or (last stage) the logits and top-k ids."""
    made = [Message(owner, chunk, MessageKind.TAP, i) for i in layout.taps_of(stage)]
    if stage < layout.stages - 1:
        return made + [Message(owner, chunk, MessageKind.ACTIVATIONS)]
    if not layout.need_logits:
        return made
    made.append(Message(owner, chunk, MessageKind.LOGITS))
    return made + [Message(owner, chunk, MessageKind.TOPK_IDS)] if layout.logits_topk else made


def receiver_of(stage: int, m: Message) -> int:
    """Activations go down the pipeline; everything else to the stage that owns the chunk."""
    return stage + 1 if m.kind == MessageKind.ACTIVATIONS else m.owner


def transfers(layout: PipelineLayout) -> list[Transfer]:
    """Every message of a call that crosses ranks, in the one order both sides post them: by tick,
    within a tick by sending stage, each stage's messages in the order it makes them.  A tick's
    activations are used in the next tick, so the order follows the data."""
    return [Transfer(tick, stage, receiver_of(stage, m), m)
            for tick in range(ticks(layout)) for stage in range(layout.stages)
            if (at := chunk_at(layout, stage, tick)) is not None
            for m in made_by(layout, stage, *at) if receiver_of(stage, m) != stage]


def posts(layout: PipelineLayout, stage: int) -> list[list[Transfer]]:
    """``stage``'s own share of ``transfers``, tick by tick: what it posts, in order, each tick."""
    mine = [[] for _ in range(ticks(layout))]
    for t in transfers(layout):
        if stage in (t.sender, t.receiver):
            mine[t.tick].append(t)
    return mine


def returned_to(layout: PipelineLayout, owner: int) -> list[Message]:
    """Everything the stages send back to ``owner`` (or make for it in place): its chunks' taps,
    logits and top-k ids."""
    return [m for c in range(layout.chunks) for s in range(layout.stages) for m in made_by(layout, s, owner, c)
            if m.kind != MessageKind.ACTIVATIONS]


def buffer_shape(layout: PipelineLayout, m: Message, rows: int, tokens: int) -> tuple[tuple, torch.dtype]:
    """Shape and dtype of message ``m`` for a chunk of ``rows`` × ``tokens`` ids."""
    return {MessageKind.ACTIVATIONS: ((rows, tokens, layout.hidden_size), layout.dtype),
            MessageKind.TAP: ((rows, tokens, layout.filter_dim), torch.float32),
            MessageKind.LOGITS: ((rows, tokens, layout.logits_width), layout.logits_dtype),
            MessageKind.TOPK_IDS: ((rows, tokens, layout.logits_topk), torch.int64)}[m.kind]
