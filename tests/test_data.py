"""The engine's loader: windows over the token stream, seeded order, resumable disjoint sampling;
weighted mixtures of sources, their config and dataset checks, and BOS at build time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.build import BuildOptions, build
from data_prep.errors import UserError
from data_prep.indexed import IndexedShard
from harness.common import corpus_lines
from ted_ds.config import DataConfig, SourceConfig, load_run_config
from ted_ds.data import Blend, BlendedDataset, ConsumedSamplesSampler, PackedShardDataset, collate, epoch_order
from ted_ds.errors import ConfigError
from ted_ds.plan import check_sources


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
    ahead = b.upcoming()  # what a read-ahead reads (RowsAhead): the next batch, the counter left where it is
    assert ahead == b.upcoming() == a.next_batch() == b.next_batch()


def test_sampler_rejects_inconsistent_batch_and_state():
    with pytest.raises(UserError, match="not a multiple"):
        ConsumedSamplesSampler(100, 10, 4, 0, 2, 0)
    s = ConsumedSamplesSampler(100, 8, 2, 0, 2, 0)
    with pytest.raises(UserError, match="global batch"):
        s.load_state_dict({"consumed_samples": 8, "seed": 0, "global_batch": 16})


# ----------------------------------------------------------------------------- mixtures
def _blend(weights, sizes=None) -> Blend:
    sizes = sizes or [1000 + 37 * i for i in range(len(weights))]
    return Blend(tuple(f"s{i}" for i in range(len(weights))), tuple(sizes), tuple(weights))


def _stream(blend: Blend, batches: int, gb: int = 8, mb: int = 2, ranks: int = 1, seed: int = 7) -> list[int]:
    """Global batches ``0..batches-1`` as one list of indices: each rank's slice, in rank order."""
    samplers = [ConsumedSamplesSampler(blend, gb, mb, r, ranks, seed) for r in range(ranks)]
    return [i for _ in range(batches) for s in samplers for m in s.next_batch() for i in m]


def _source_of(blend: Blend, indices) -> np.ndarray:
    return np.searchsorted(blend.offsets, indices, side="right") - 1


@pytest.mark.parametrize("weights", [(0.75, 0.25), (0.5, 0.3, 0.2)])
def test_blend_shares_stay_within_one_point_of_the_weights(weights):
    blend = _blend(weights)
    sources = _source_of(blend, _stream(blend, 400))  # 400 global batches of 8
    assert len(sources) == 3200
    for start in range(0, len(sources) - 1000 + 1):  # every window of 1,000 consecutive samples
        window = sources[start:start + 1000]
        shares = np.bincount(window, minlength=len(weights)) / 1000
        assert np.abs(shares - weights).max() <= 0.01, (start, shares)
    # the closed-form counts agree with what the stream dealt, and need no scan from 0 far into a run
    assert blend.counts(len(sources)).tolist() == np.bincount(sources, minlength=len(weights)).tolist()
    far = 10**12 + 12345
    assert blend.counts(far).sum() == far and np.abs(blend.counts(far) / far - weights).max() < 1e-9
    far_sampler = ConsumedSamplesSampler(blend, 8, 8, 0, 1, seed=7, consumed=far)
    source, n = blend.locate(np.arange(far, far + 8))
    assert far_sampler.next_batch()[0] == [blend.offsets[s] + epoch_order(blend.sizes[s], 7, k // blend.sizes[s], s)[
        k % blend.sizes[s]] for s, k in zip(source, n)]


@pytest.mark.parametrize("weights", [(0.75, 0.25), (0.5, 0.3, 0.2), (3.0, 0.0, 1.0)])
def test_blend_gives_the_same_global_batches_on_any_rank_count_and_after_a_resume(weights):
    blend = _blend(weights, [50, 13, 29][:len(weights)])
    one = _stream(blend, 40, gb=8, mb=8, ranks=1)
    assert _stream(blend, 40, gb=8, mb=2, ranks=2) == one  # the union of the ranks' slices, batch by batch
    assert _stream(blend, 40, gb=8, mb=1, ranks=4) == one
    # resume mid-way from the saved state, on another rank count
    first = ConsumedSamplesSampler(blend, 8, 2, 0, 2, seed=7)
    for _ in range(17):
        first.next_batch()
    resumed = []
    for r in range(4):
        s = ConsumedSamplesSampler(blend, 8, 1, r, 4, seed=7)
        s.load_state_dict(first.state_dict())
        resumed.append([[i for m in s.next_batch() for i in m] for _ in range(23)])
    assert [i for b in range(23) for r in range(4) for i in resumed[r][b]] == one[17 * 8:]


def test_a_small_source_repeats_with_a_fresh_order_per_epoch_and_counts_its_epochs():
    blend = _blend((0.75, 0.25), [1000, 10])
    stream = np.array(_stream(blend, 50))  # 400 samples: 100 from the small source, 10 epochs
    small = stream[_source_of(blend, stream) == 1] - blend.offsets[1]
    epochs = small.reshape(10, 10)
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch visits every sample once
    assert len({tuple(e) for e in epochs}) == 10  # and in its own order
    assert epochs[3].tolist() == epoch_order(10, 7, 3, source=1).tolist()
    state = ConsumedSamplesSampler(blend, 8, 2, 0, 1, seed=7, consumed=400).state_dict()
    assert state["sources"] == {"s0": {"samples": 300, "epochs": 0.3, "weight": 0.75},
                                "s1": {"samples": 100, "epochs": 10.0, "weight": 0.25}}


def test_one_source_keeps_todays_order_and_state():
    """A one-source run deals exactly what the sampler did before mixtures: order keyed by (seed, epoch)."""
    legacy = np.random.Generator(np.random.PCG64([5, 2])).permutation(37)
    assert epoch_order(37, 5, 2).tolist() == legacy.tolist()
    assert not np.array_equal(epoch_order(37, 5, 2, source=1), legacy)
    a, b = ConsumedSamplesSampler(37, 8, 4, 1, 2, 5), ConsumedSamplesSampler(Blend.single(37), 8, 4, 1, 2, 5)
    assert [a.next_batch() for _ in range(12)] == [b.next_batch() for _ in range(12)]
    c = ConsumedSamplesSampler(37, 8, 4, 0, 1, 5, consumed=72)  # epoch 2 starts at position 74
    assert c.next_batch()[0][2:] == legacy[:2].tolist()


def test_resume_refuses_other_weights():
    s = ConsumedSamplesSampler(_blend((0.75, 0.25)), 8, 2, 0, 1, 0, consumed=16)
    t = ConsumedSamplesSampler(_blend((0.5, 0.5)), 8, 2, 0, 1, 0)
    with pytest.raises(UserError, match=r"source weights \{'s0': 0.75, 's1': 0.25\}"):
        t.load_state_dict(s.state_dict())


def test_blended_dataset_reads_each_source(dataset_dir, tmp_path, sp_tokenizer):
    other = _build(tmp_path / "b", sp_tokenizer, corpus_lines(60, start=500))
    a, b = PackedShardDataset(dataset_dir, "train", 50), PackedShardDataset(other, "train", 50)
    both = BlendedDataset([a, b])
    assert len(both) == len(a) + len(b)
    assert np.array_equal(both[len(a) - 1], a[len(a) - 1]) and np.array_equal(both[len(a) + 2], b[2])


# ----------------------------------------------------------------------------- bad input, one line each
def _load(tmp_path, **data) -> object:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": data, "student": {"config": "x"}, "distill": {"method": "lm"},
                                    "train": {"steps": 1}}))
    return load_run_config(str(path))


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"name": "a", "path": "x", "weight": -1}]}, r"data.sources\[0\] \(a\): weight must be a number ≥ 0"),
    ({"sources": [{"name": "a", "path": "x", "weight": float("nan")}]}, "weight must be a number ≥ 0, got nan"),
    ({"sources": [{"name": "a", "path": "x", "weight": "lots"}]}, r"data.sources\[0\].weight must be float"),
    ({"sources": [{"name": "a", "path": "x", "weight": True}]}, r"data.sources\[0\].weight must be float"),
    ({"sources": [{"name": "a", "path": "x", "weight": 0}, {"name": "b", "path": "y", "weight": 0.0}]},
     "data.sources: all weights are 0"),
    ({"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "duplicate name 'a'"),
    ({"sources": [{"path": "x"}]}, r"data.sources\[0\]: name is required"),
    ({"sources": [{"name": "a", "path": "x"}, {"name": "b"}]}, r"data.sources\[1\]: path is required"),
    ({"sources": []}, "data.sources is empty"),
    ({"path": "x", "sources": [{"name": "a", "path": "x"}]}, "give data.path .* or data.sources, not both"),
    ({}, "data.path is required"),
])
def test_bad_data_configs_fail_with_one_line(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message) as err:
        _load(tmp_path, **data)
    assert "\n" not in str(err.value)


def test_sources_load_with_defaults(tmp_path):
    data = _load(tmp_path, sources=[{"name": "web", "path": "w", "weight": 3}, {"name": "code", "path": "c"}]).data
    assert data.blend == [SourceConfig("web", "w", 3.0), SourceConfig("code", "c", 1.0)]
    assert _load(tmp_path, path="p").data.blend == [SourceConfig("data", "p", 1.0)]


def _build(out, tokenizer: str, lines: list[str], **options) -> str:
    corpus = out.parent / f"{out.name}.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    build(BuildOptions(inputs=[str(corpus)], tokenizer=tokenizer, out=str(out), progress=False,
                       **{"valid_fraction": 0.2, **options}))
    return str(out)


@pytest.fixture(scope="module")
def sources(sp_tokenizer, gpt2_tokenizer, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sources")
    lines = corpus_lines(80, start=400)
    return {"sp": _build(root / "sp", sp_tokenizer, lines), "sp2": _build(root / "sp2", sp_tokenizer, lines[:40]),
            "gpt2": _build(root / "gpt2", gpt2_tokenizer, lines),
            "bos": _build(root / "bos", sp_tokenizer, lines, add_bos=True),
            "novalid": _build(root / "novalid", sp_tokenizer, lines, valid_fraction=0.0)}


def _data(sources: dict, *names: str) -> DataConfig:
    return DataConfig(sources=[SourceConfig(n, sources[n], 1.0) for n in names], seq_len=16)


def test_sources_must_share_tokenizer_bos_and_evaluation(sources):
    assert len(check_sources(_data(sources, "sp", "sp2"))) == 2
    for names, message in ((("sp", "gpt2"), "data sources sp and gpt2 were built with different tokenizers"),
                           (("sp", "bos"), "data sources bos and sp differ in BOS"),
                           (("sp", "novalid"), r"data source novalid \(.*\): valid split has 0 tokens")):
        with pytest.raises(ConfigError, match=message) as err:
            check_sources(_data(sources, *names))
        assert "\n" not in str(err.value)
    assert len(check_sources(_data(sources, "novalid"))) == 1  # no source evaluates: evaluation is off


def test_add_bos_starts_every_document_with_bos(sources, sp_tokenizer, tmp_path, capsys):
    from data_prep.cli import main
    from data_prep.format import read_manifest

    plain, bos = read_manifest(sources["sp"]), read_manifest(sources["bos"])
    assert bos["add_bos"] is True and plain["add_bos"] is False
    for split in ("train", "valid"):
        a = IndexedShard(f"{sources['sp']}/{split}-00000", "megatron")
        b = IndexedShard(f"{sources['bos']}/{split}-00000", "megatron")
        assert len(a) == len(b) and b.num_tokens == a.num_tokens + len(a)
        for i in range(len(a)):
            assert b.document(i).tolist() == [1] + a.document(i).tolist()  # <s> = 1 in the ted-prep tokenizer
    no_bos = _tokenizer_without_bos(tmp_path / "tok")
    assert main(["build", "--input", str(tmp_path / "tok" / "tokenizer.json"), "--tokenizer", no_bos,
                 "--out", str(tmp_path / "o"), "--add-bos"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--add-bos: tokenizer {no_bos} has no BOS token") and len(err.splitlines()) == 1


def _tokenizer_without_bos(out) -> str:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(200), vocab_size=400, special_tokens=["<eos>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(str(out))
    return str(out)
