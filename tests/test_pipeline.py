"""The pipeline teacher's bookkeeping, without processes: message tags and the layout handshake."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from ted_ds.documents import DocumentAttention
from ted_ds.errors import ConfigError
from ted_ds.pipeline.layout import PipelineLayout
from ted_ds.pipeline.messages import MAX_TAG, Message, MessageKind, TagAllocator


def _messages(owners: int, chunks: int, taps: int):
    for owner, chunk in itertools.product(range(owners), range(chunks)):
        for kind in MessageKind:
            for tap in range(taps) if kind == MessageKind.TAP else [0]:
                yield Message(owner, chunk, kind, tap)


@pytest.mark.parametrize("owners,chunks,taps", [(1, 1, 0), (2, 3, 2), (4, 2, 61), (3, 4, 62), (2, 2, 200)])
def test_every_message_of_a_call_gets_its_own_tag(owners, chunks, taps):
    """Distinct tags for every (owner, chunk, kind, tap) in range, past the 61 taps where the old
    ``*64 + kind`` packing collided."""
    tags = TagAllocator(owners, chunks, taps)
    messages = list(_messages(owners, chunks, taps))
    got = [tags.tag(m) for m in messages]
    assert len(set(got)) == len(messages) == owners * chunks * (3 + taps)
    assert min(got) >= 0 and max(got) <= MAX_TAG


def test_a_message_out_of_range_or_too_many_tags_is_a_clear_error():
    tags = TagAllocator(2, 3, 4)
    for bad, words in [(Message(0, 0, MessageKind.TAP, 4), "tap must be below 4"),
                       (Message(0, 3, MessageKind.LOGITS), "chunk below 3"),
                       (Message(2, 0, MessageKind.ACTIVATIONS), "owner must be below 2"),
                       (Message(0, 0, MessageKind.TOPK_IDS, 1), "only a TAP message")]:
        with pytest.raises(ValueError, match=words):
            tags.tag(bad)
    with pytest.raises(ConfigError, match="point-to-point tags"):
        TagAllocator(8, 2**20, 2**10)


LAYOUT = PipelineLayout(blocks=((0, 2), (2, 4)), tap_layers=(2, 4), chunks=2, hidden_size=64, filter_dim=64,
                        need_logits=True, logits_topk=0, logits_dtype=torch.float32, vocab=500, dtype=torch.float32,
                        documents=None)
OTHER = dict(blocks=((0, 1), (1, 4)), tap_layers=(1, 4), chunks=1, hidden_size=32, filter_dim=32, need_logits=False,
             logits_topk=8, logits_dtype=torch.bfloat16, vocab=499, dtype=torch.bfloat16,
             documents=DocumentAttention(2, torch.float32, "sdpa"))


def test_the_layout_handshake_covers_every_field():
    assert {f.name for f in dataclasses.fields(PipelineLayout)} == set(OTHER)
    assert LAYOUT.fingerprint() == dataclasses.replace(LAYOUT).fingerprint()
    for name, value in OTHER.items():
        assert dataclasses.replace(LAYOUT, **{name: value}).fingerprint() != LAYOUT.fingerprint(), name
    assert [LAYOUT.taps_of(s) for s in range(LAYOUT.stages)] == [[0], [1]]
    with pytest.raises(ConfigError, match="tap layer 5 is outside"):
        dataclasses.replace(LAYOUT, tap_layers=(2, 5))
