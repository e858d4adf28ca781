"""The engine's loader: windows over the token stream, seeded order, resumable disjoint sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.build import BuildOptions, build
from data_prep.errors import UserError
from ted_ds.data import ConsumedSamplesSampler, PackedShardDataset, collate, epoch_order


@pytest.fixture(scope="module")
def dataset_dir(sp_tokenizer, corpus_file, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ds") / "ds")
    build(BuildOptions(inputs=[corpus_file], tokenizer=sp_tokenizer, out=out, shard_mb=0.03, progress=False))
    return out


def test_windows_cover_the_concatenated_stream_across_shards(dataset_dir):
    ds = PackedShardDataset(dataset_dir, "train", seq_len=100)
    assert len(ds.shards) > 2
    stream = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in ds.shards])
    assert len(ds) == (len(stream) - 1) // 100
    for i in range(len(ds)):
        assert np.array_equal(ds[i], stream[i * 100: i * 100 + 101])
    x, y = collate(ds, [3, 0])
    assert x.shape == y.shape == (2, 100)
    assert np.array_equal(x[0].numpy(), stream[300:400]) and np.array_equal(y[0].numpy(), stream[301:401])
    with pytest.raises(UserError, match="too few"):
        PackedShardDataset(dataset_dir, "valid", seq_len=10**7)


def test_epoch_order_is_a_seeded_permutation():
    a, b, c = epoch_order(1000, 1, 0), epoch_order(1000, 1, 0), epoch_order(1000, 1, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(1000)) and sorted(c.tolist()) == list(range(1000))


def _global_batch(n, gb, mb, ranks, seed, consumed):
    per_rank = []
    for r in range(ranks):
        s = ConsumedSamplesSampler(n, gb, mb, r, ranks, seed, consumed)
        micro = s.next_batch()
        assert len(micro) == s.accumulation_steps and all(len(m) == mb for m in micro)
        per_rank.append([i for m in micro for i in m])
    return per_rank


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 300), mb=st.integers(1, 4), ranks=st.sampled_from([1, 2, 4]), accum=st.integers(1, 3),
       seed=st.integers(0, 2**31), steps=st.integers(1, 12))
def test_sampler_disjoint_covering_resumable_and_rank_count_free(n, mb, ranks, accum, seed, steps):
    gb = mb * ranks * accum
    consumed = 0
    seen: list[int] = []
    for _ in range(steps):
        per_rank = _global_batch(n, gb, mb, ranks, seed, consumed)
        flat = [i for r in per_rank for i in r]
        # ranks get disjoint slices of the stream positions that together make the global batch
        positions = [p for r in range(ranks) for p in ConsumedSamplesSampler(n, gb, mb, r, ranks, seed,
                                                                             consumed).rank_positions()]
        assert positions == list(range(consumed, consumed + gb))
        # the same global batch on one rank (a resume on another rank count) holds the same samples
        assert _global_batch(n, gb, gb, 1, seed, consumed)[0] == flat
        seen += flat
        consumed += gb
    # every epoch visits each sample exactly once before any repeats
    full = len(seen) // n
    for e in range(full):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    # a sampler resumed from the counter continues exactly where an uninterrupted one is
    a = ConsumedSamplesSampler(n, gb, mb, 0, ranks, seed)
    for _ in range(steps):
        a.next_batch()
    b = ConsumedSamplesSampler(n, gb, mb, 0, ranks, seed)
    b.load_state_dict(a.state_dict())
    assert a.next_batch() == b.next_batch()


def test_sampler_rejects_inconsistent_batch_and_state():
    with pytest.raises(UserError, match="not a multiple"):
        ConsumedSamplesSampler(100, 10, 4, 0, 2, 0)
    s = ConsumedSamplesSampler(100, 8, 2, 0, 2, 0)
    with pytest.raises(UserError, match="global batch"):
        s.load_state_dict({"consumed_samples": 8, "seed": 0, "global_batch": 16})
