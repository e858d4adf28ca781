"""The tensors pipeline stages send each other, named in one place: a ``Message`` is both the key
of its receive buffer and, through ``TagAllocator``, its point-to-point tag, so sender and receiver
cannot disagree and no two messages of a call share a tag."""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from ted_ds.errors import ConfigError

MAX_TAG = 2**31 - 1  # torch.distributed tags are C ints (gloo: 32 bits)


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


class TagAllocator:
    """Dense tags: each (owner, chunk) gets one slot per kind and per tap."""

    def __init__(self, owners: int, chunks: int, taps: int):
        self.owners, self.chunks, self.taps = owners, chunks, taps
        self.slots = MessageKind.TAP + taps
        if owners * chunks * self.slots - 1 > MAX_TAG:
            raise ConfigError(f"pipeline teacher: {owners} stages × {chunks} chunks × {self.slots} messages need "
                              f"more point-to-point tags than {MAX_TAG + 1}; use fewer chunks or taps")

    def tag(self, m: Message) -> int:
        if not (0 <= m.owner < self.owners and 0 <= m.chunk < self.chunks):
            raise ValueError(f"{m}: owner must be below {self.owners} and chunk below {self.chunks}")
        if m.kind == MessageKind.TAP:
            if not 0 <= m.tap < self.taps:
                raise ValueError(f"{m}: tap must be below {self.taps}")
            slot = MessageKind.TAP + m.tap
        elif m.tap:
            raise ValueError(f"{m}: only a TAP message has a tap index")
        else:
            slot = int(m.kind)
        return (m.owner * self.chunks + m.chunk) * self.slots + slot
