"""The teacher cache without processes: a window's bytes round trip, ids in as few bits as the vocabulary
needs, the rounding the online teacher and the cache share, rows found by the sampler's index across
sources, damaged blocks refused, and ``cache-teacher``'s bad input as one line before anything is written."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  a transformers model imports it, which sets TORCHINDUCTOR_CACHE_DIR
import zstandard

from data_prep.errors import UserError
from harness.tiny import base_config, write_config
from ted_ds.cache.ahead import RowsAhead
from ted_ds.cache.format import (
    BlockFile,
    CacheRows,
    block_name,
    decode_variable,
    decode_window,
    encode_variable,
    encode_window,
    fold_tail,
    id_bits,
    mismatch,
    to_bits,
    write_block,
)
from ted_ds.teacher import TopP, sampled_logits, support, teacher_logits

L = 12


def topk_rows(vocab: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of random logits with the awkward cases in them: ties, +0 and -0, negatives, fp16 overflow."""
    g = torch.Generator().manual_seed(seed)
    logits = 6 * torch.randn(L, vocab, generator=g)
    logits[0, :k + 2] = 0.0
    logits[0, 1::2] = -0.0
    logits[1] = -3.0
    logits[2, 5] = 7e4  # inf in fp16
    logits[3, -1] = 50.0  # the last id
    return logits.topk(k, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab,k", [(1000, 1), (1000, 8), (128256, 64)])
def test_a_window_round_trips_bit_for_bit(dtype, vocab, k):
    values, ids = topk_rows(vocab, k)
    bits = to_bits(values, dtype)
    got_bits, got_ids = decode_window(encode_window(bits, ids.numpy(), id_bits(vocab)), L, k, id_bits(vocab))
    assert np.array_equal(got_bits, bits) and np.array_equal(got_ids, ids.numpy())
    back = torch.from_numpy(got_bits.view(np.int16)).view(dtype)
    assert torch.equal(back, values.to(dtype))  # the very values (and signed zeros) the teacher gave


def test_ids_take_as_few_bits_as_the_vocabulary_needs():
    assert [id_bits(v) for v in (2, 1000, 1024, 1025, 65536, 128256)] == [1, 10, 10, 11, 16, 17]
    values, ids = topk_rows(128256, 64)
    frame = encode_window(to_bits(values, torch.float16), ids.numpy(), 17)
    raw = zstandard.ZstdDecompressor().decompress(frame)
    assert len(raw) == 2 * L * 64 + math.ceil(L * 64 * 17 / 8)  # 16-bit values, 17-bit ids, before zstd


def test_teacher_logits_rounds_once_for_every_path():
    """One function makes what KD reads online and what the cache stores: cut, top-k, round."""
    logits = 5 * torch.randn(2, L, 40, generator=torch.Generator().manual_seed(1))
    values, index = teacher_logits(logits, 32, 4, torch.float16)
    want_values, want_index = logits[..., :32].topk(4, dim=-1)
    assert values.dtype == torch.float16 and torch.equal(values, want_values.half()) and torch.equal(index, want_index)
    same, none = teacher_logits(logits.bfloat16(), None, 0, torch.float32)  # fp32 rounds nothing
    assert none is None and same.dtype == torch.bfloat16 and torch.equal(same, logits.bfloat16())


def test_the_tail_logit_is_the_teachers_mass_off_its_top_k():
    """softmax over the top-k and the tail logit at T is the teacher's softened p on K and 1 − Σ_K p; at k = V
    the tail is empty (−inf)."""
    logits = 5 * torch.randn(2, L, 40, generator=torch.Generator().manual_seed(2))
    values, index = teacher_logits(logits, 32, 4, tail_temperature=2.0)
    p = torch.softmax(logits[..., :32] / 2.0, -1)
    on_support = torch.softmax(values / 2.0, -1)
    torch.testing.assert_close(on_support[..., :4], p.gather(-1, index), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(on_support[..., 4], 1 - p.gather(-1, index).sum(-1), rtol=1e-5, atol=1e-7)
    assert teacher_logits(logits, 32, 32, tail_temperature=2.0)[0][..., -1].eq(-math.inf).all()
    rounded, _ = teacher_logits(logits, 32, 4, torch.float16, 2.0)
    assert rounded.dtype == torch.float16 and torch.equal(rounded, values.half())  # rounded once, the tail too


def test_top_p_keeps_the_fewest_top_ids_whose_probability_reaches_p():
    """p at T = 2 is (1/2, 1/4, 1/8, 3/32, 1/32) (sums exact in binary): the support is the fewest top ids whose
    p reaches the cut, at most k; the dropped ones are −inf and their mass is in the tail logit."""
    probs = torch.tensor([3 / 32, 0.5, 0.125, 1 / 32, 0.25])  # ids 1, 4, 2, 0, 3
    logits = (2.0 * probs.log()).expand(6, 5)
    cuts = torch.tensor([0.5, 0.7, 0.75, 0.8, 1.0, 0.3])
    want = [1, 2, 2, 3, 4, 1]  # 1/2 reaches 0.5; 3/4 reaches 0.7 and 0.75; 7/8 reaches 0.8; 1.0 needs all, capped
    for row, (cut, n) in enumerate(zip(cuts.tolist(), want)):
        values, index = teacher_logits(logits[row], None, 4, tail_temperature=2.0, top_p=TopP(cut, 2.0))
        assert support(values, index).sum().item() == n, cut
        kept = probs[index[:n]].sum().item()
        assert torch.equal(index[:n], torch.tensor([1, 4, 2, 0][:n])) and values[n:4].eq(-math.inf).all()
        assert math.isclose(math.exp(values[4].item() / 2.0 - (values / 2.0).logsumexp(-1).item()), 1 - kept,
                            rel_tol=1e-6)
    renormalized, _ = teacher_logits(logits[2], None, 4, top_p=TopP(0.75, 2.0))  # no tail: the same support
    assert renormalized.shape == (4,) and renormalized.isfinite().sum() == 2


def test_a_variable_window_round_trips_bit_for_bit():
    """Top-p (the kept values and the tail logit) and sampled (ids, their draws, log p) windows: only the
    kept entries are stored, and they come back with zero values past them (top-p's ids: the top id)."""
    logits = torch.linspace(4, 16, L)[:, None] * torch.randn(L, 1000, generator=torch.Generator().manual_seed(5))
    values, ids = teacher_logits(logits, None, 16, tail_temperature=2.0, top_p=TopP(0.6, 2.0))
    kept = support(values, ids).sum(-1).numpy()
    assert kept.min() >= 1 and kept.max() <= 16 and len(set(kept.tolist())) > 1
    bits = to_bits(values, torch.float16)
    frame = encode_variable(bits, ids.numpy(), 10, kept)
    got, got_ids, got_kept, draws = decode_variable(frame, L, 16, 10, tail=True, sampled=False)
    on = np.arange(16)[None] < kept[:, None]
    assert draws is None and np.array_equal(got_kept, kept) and np.array_equal(got_ids, ids.numpy())  # top id past
    assert np.array_equal(got[:, :16][on], bits[:, :16][on]) and np.array_equal(got[:, 16], bits[:, 16])
    assert not got[:, :16][~on].any()
    assert len(zstandard.ZstdDecompressor().decompress(frame)) == 2 * L + 2 * (kept.sum() + L) + math.ceil(
        kept.sum() * 10 / 8)
    logp, drawn, counts = sampled_logits(logits[None], [7], 32, 2.0, torch.float16)
    n = (counts[0] > 0).sum(-1).numpy()
    frame = encode_variable(to_bits(logp[0], torch.float16), drawn[0].numpy(), 10, n, counts[0].numpy())
    got, got_ids, got_kept, draws = decode_variable(frame, L, 32, 10, tail=False, sampled=True)
    assert np.array_equal(got, to_bits(logp[0], torch.float16)) and np.array_equal(got_ids, drawn[0].numpy())
    assert np.array_equal(draws, counts[0].numpy()) and np.array_equal(got_kept, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_window_with_its_tail_logit_round_trips_bit_for_bit(dtype):
    """The tail logit, last, is out of the descending order the value codes expect: exact all the same."""
    logits = 6 * torch.randn(L, 1000, generator=torch.Generator().manual_seed(3))
    values, ids = teacher_logits(logits, None, 8, tail_temperature=2.0)
    bits = to_bits(values, dtype)
    got_bits, got_ids = decode_window(encode_window(bits, ids.numpy(), 10), L, 8, 10, tail=True)
    assert np.array_equal(got_bits, bits) and np.array_equal(got_ids, ids.numpy())


def test_a_smaller_k_folds_the_rest_into_the_tail():
    """A run reading k = 3 of a k = 8 cache gets the first 3 values and a tail logit holding the other 5 and
    the old tail: the online teacher's k = 3 numbers, up to the cache's fp16 rounding."""
    logits = 4 * torch.randn(2, L, 60, generator=torch.Generator().manual_seed(4))
    cached, _ = teacher_logits(logits, None, 8, torch.float16, 2.0)
    online, _ = teacher_logits(logits, None, 3, torch.float32, 2.0)
    assert torch.equal(fold_tail(cached, 8, 2.0), cached)
    folded = fold_tail(cached, 3, 2.0)
    assert folded.shape == (2, L, 4)
    torch.testing.assert_close(folded, online, rtol=2e-3, atol=2e-3)


def test_a_cache_without_the_runs_tail_is_refused_in_one_line():
    """A ted-cache/1 cache (or one built for the renormalized form) serves the renormalized form only; a tail
    cache serves its own temperature only."""
    run = {"teacher": {"digest": "d"}, "tokenizer": {"vocab_sha256": "v"}, "seq_len": 8, "document_attention": False,
           "value_dtype": "fp16", "k": 4, "tail_temperature": 2.0}
    old = {**run, "sources": {}, "k": 8}
    del old["tail_temperature"]
    assert mismatch("c", old, {**run, "tail_temperature": None}, {}) is None
    assert mismatch("c", old, run, {}) == ("teacher.cache c holds no tail logits (made for the renormalized form): "
                                           "rebuild it with ted-ds cache-teacher, or set "
                                           "teacher.logits_topk_form: renormalized")
    assert "holds its tail logits at temperature 1; this run has distill.temperature 2" in \
        mismatch("c", {**old, "tail_temperature": 1.0}, run, {})
    assert mismatch("c", {**old, "tail_temperature": 2.0}, run, {}) is None


def _fake_cache(root: str, sizes: dict[str, int], k: int = 3, block_windows: int = 4) -> dict:
    """A cache whose window j of source s holds the values s·100 + j (and ids j) everywhere."""
    sources = {}
    for s, (key, n) in enumerate(sizes.items()):
        for b in range(math.ceil(n / block_windows)):
            frames = []
            for j in range(b * block_windows, min(n, (b + 1) * block_windows)):
                values = torch.full((L, k), float(s * 100 + j))
                frames.append(encode_window(to_bits(values, torch.float16), np.full((L, k), j), 10))
            write_block(os.path.join(root, block_name(key, "train", b)), frames)
        sources[key] = {"splits": {"train": {"windows": n}}}
    return {"sources": sources, "block_windows": block_windows, "seq_len": L, "k": k, "id_bits": 10,
            "value_dtype": "fp16"}  # a ted-cache/1 manifest: no tail_temperature


def test_rows_are_found_by_the_samplers_index_across_sources(tmp_path):
    manifest = _fake_cache(str(tmp_path), {"aaa": 10, "bbb": 6})
    rows = CacheRows(str(tmp_path), manifest, ["bbb", "aaa"], k=2, tail=False)  # blended in the other order
    values, ids, _ = rows.read([0, 5, 6, 15])  # bbb 0 and 5; aaa 0 and 9
    assert values.dtype == torch.float16 and values.shape == (4, L, 2) and ids.shape == (4, L, 2)
    assert values[:, 0, 0].tolist() == [100.0, 105.0, 0.0, 9.0]
    assert ids[:, 0, 0].tolist() == [0, 5, 0, 9]


class ThreadsSeen(CacheRows):
    """CacheRows that records, per read, the samples and the thread that read them."""

    def read(self, samples):
        self.seen = getattr(self, "seen", []) + [(samples, threading.current_thread().name)]
        return super().read(samples)


def test_the_next_batchs_rows_are_read_ahead_on_the_data_thread(tmp_path):
    manifest = _fake_cache(str(tmp_path), {"aaa": 10, "bbb": 6})
    rows = ThreadsSeen(str(tmp_path), manifest, ["aaa", "bbb"], k=2, tail=False)
    ahead = RowsAhead(rows)
    first = ahead.take([[1, 12], [3]], [[4], [15]])
    assert [r[0][:, 0, 0].tolist() for r in first] == [[1.0, 102.0], [3.0]]  # source bbb's window 2: 100 + 2
    ahead.ahead[1].result()  # the following batch is read while the step (here: nothing) runs
    assert rows.seen[-2:] == [([4], "teacher-rows_0"), ([15], "teacher-rows_0")]
    second = ahead.take([[4], [15]], [[0], [1]])
    assert [r[0][:, 0, 0].tolist() for r in second] == [[4.0], [105.0]]
    assert all(thread == "teacher-rows_0" for _, thread in rows.seen) and [4] not in [s for s, _ in rows.seen[4:]]
    moved = ahead.take([[9]], [[0]])  # not the batch read ahead (a resume moved the sampler): read now
    assert moved[0][0][:, 0, 0].tolist() == [9.0]


def test_a_damaged_block_is_refused(tmp_path):
    _fake_cache(str(tmp_path), {"aaa": 4})
    path = os.path.join(tmp_path, block_name("aaa", "train", 0))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)
    with pytest.raises(UserError, match="its index says"):
        BlockFile(path)
    with open(path, "r+b") as f:
        f.write(b"NOTACACH")
    with pytest.raises(UserError, match="not a teacher cache block"):
        BlockFile(path)


@pytest.mark.parametrize("over,says", [
    ({"teacher.logits_topk": 0}, "set teacher.logits_topk"),
    ({"teacher.logits_dtype": "fp32"}, "set teacher.logits_dtype to fp16 or bf16"),
    ({"teacher.logits_topk": 0, "teacher.logits_sampling": "sampled", "teacher.logits_samples": 70000},
     "at most 65535"),
    ({}, None),  # a good run, but --out holds something else
])
def test_cache_teacher_refuses_bad_input_before_writing(tiny, tmp_path, capsys, over, says):
    from ted_ds.cli import main

    cfg = base_config(tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "run"),
                      **{"teacher.logits_topk": 8, "teacher.logits_dtype": "fp16", **over})
    config = write_config(str(tmp_path / "run.yaml"), **cfg)
    out = str(tmp_path / "cache")
    if says is None:  # an --out holding something else
        os.makedirs(out)
        open(os.path.join(out, "notes.txt"), "w").close()
        says = "holds no teacher cache"
    assert main(["cache-teacher", "--config", config, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ted-ds: error: ") and says in err[0], err
    assert not os.path.exists(out) or os.listdir(out) == ["notes.txt"]


def _cache_identity(**over) -> dict:
    """A cache manifest's identity (``format.identity`` of the run that built it), with ``over`` changed."""
    identity = {"format": 2, "teacher": {"path": "t", "revision": None, "digest": "d0"},
                "tokenizer": {"vocab_sha256": "v0", "vocab_size": 500}, "seq_len": 64, "k": 8,
                "value_dtype": "bf16", "document_attention": False, "tail_temperature": 2.0,
                "sources": {"s0": {"name": "wiki", "path": "w"}}}
    return {**identity, **over}


@pytest.mark.parametrize("run_over, says", [
    ({"tokenizer": {"vocab_sha256": "v1", "vocab_size": 500}},
     "was made with another tokenizer than the data's (vocabulary sha256 differs)"),
    ({"document_attention": True}, "was made with data.document_attention false; this run has true"),
    ({"seq_len": 128}, "holds windows of seq_len 64; this run has data.seq_len 128"),
    ({"top_p": 0.95}, "was made with teacher.logits_top_p none (top_p); this run has 0.95: rebuild it with ted-ds "
                      "cache-teacher or match the run to it"),
    ({"samples": 64, "sampling_seed": 1, "sampling_temperature": 2.0}, "was made with teacher.logits_samples none "
     "(samples); this run has 64: rebuild it with ted-ds cache-teacher or match the run to it"),
])
def test_a_cache_of_another_tokenizer_or_attention_is_refused(run_over, says):
    """What a run and its cache must share, checked before any window is read (the teacher, the data,
    the top-k and the value dtype: test_cache_multirank.py)."""
    from ted_ds.cache.format import mismatch

    sources = {"s0": ("wiki", "w")}
    assert mismatch("/c", _cache_identity(), _cache_identity(), sources) is None
    assert mismatch("/c", _cache_identity(), _cache_identity(**run_over), sources) == f"teacher.cache /c {says}"


def test_a_sampled_cache_of_another_seed_or_temperature_is_refused():
    """Draws are seeded by train.seed and made at distill.temperature: another of either draws otherwise."""
    from ted_ds.cache.format import mismatch

    sampled = _cache_identity(samples=64, sampling_seed=1, sampling_temperature=2.0, tail_temperature=None, k=64)
    assert mismatch("/c", sampled, sampled, {}) is None
    reseeded = {**sampled, "sampling_seed": 2}
    assert "train.seed 1 (sampling_seed); this run has 2" in mismatch("/c", sampled, reseeded, {})
    assert "distill.temperature 2 (sampling_temperature); this run has 1" in mismatch(
        "/c", sampled, {**sampled, "sampling_temperature": 1.0}, {})


@pytest.mark.parametrize("cut", ["top_p", "sampled"])
def test_cached_top_p_and_sampled_rows_are_the_online_teachers(tmp_path, cut):
    """In process, on a small peaked random LLaMA: the frames ``cache-teacher`` writes (``window_frames``),
    read back by sample index across two sources (``CacheRows``), are what the online teacher hands the loss
    (``teacher_side``): top-p in the tail form (values, ids, support) and samples (log p, ids, counts,
    drawn by train.seed and the window, not by the batch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ted_ds.cache.build import window_frames
    from ted_ds.cache.format import VARIABLE_FORMAT
    from ted_ds.data import MicroBatch
    from ted_ds.teacher import Draws, FrozenLM, ReplicatedTeacher, draw_seed, teacher_side

    vocab, seq, seed = 300, 16, 5
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    model.lm_head.weight.data *= 40  # a peaked teacher: supports of different sizes
    sampled = cut == "sampled"
    k, top_p = (0, None) if sampled else (8, TopP(0.5, 2.0))
    frozen = ReplicatedTeacher(FrozenLM(model, [], None, True, logits_topk=k, vocab=vocab, logits_dtype=torch.float16,
                                        tail_temperature=None if sampled else 2.0, top_p=top_p), torch.device("cpu"))
    spec = {"value_dtype": "fp16", "id_bits": id_bits(vocab), "sampling_seed": seed, "sampling_temperature": 2.0,
            **({"samples": 16} if sampled else {"top_p": 0.5})}
    windows = torch.randint(vocab, (6, seq + 1), generator=torch.Generator().manual_seed(1))
    sources = {"aaa": windows[:4], "bbb": windows[4:]}  # the sampler's indices 0-3, then 4-5
    for key, rows in sources.items():
        frames = window_frames(frozen(rows[:, :-1]), [draw_seed(seed, key, "train", j) for j in range(len(rows))], spec)
        write_block(os.path.join(tmp_path, block_name(key, "train", 0)), frames)
    manifest = {**spec, "format": VARIABLE_FORMAT, "k": 16 if sampled else k, "seq_len": seq, "block_windows": 8,
                "tail_temperature": None if sampled else 2.0,
                "sources": {key: {"splits": {"train": {"windows": len(rows)}}} for key, rows in sources.items()}}
    cache = CacheRows(str(tmp_path), manifest, list(sources), k, tail=not sampled)
    samples = [5, 0, 3]
    read_ahead = RowsAhead(cache).take([samples], [[1]])[0]  # as the data path reads them (TrainData.next_batch)
    batch = MicroBatch(windows[samples, :-1], windows[samples, 1:], samples, None, read_ahead)
    draws = Draws(seed, 16, 2.0, torch.float16, tuple(sources), (0, 4, 6)) if sampled else None
    online = teacher_side(frozen, batch, False, draws, top_p=not sampled)
    cached = teacher_side(None, batch, True, top_p=not sampled)
    assert torch.equal(online.logits, cached.logits) and torch.equal(online.topk_index, cached.topk_index)
    if sampled:
        assert torch.equal(online.counts, cached.counts) and (online.counts.sum(-1) == 16).all()
        assert (online.counts > 0).sum(-1).float().mean() < 16  # repeated draws, stored once with their count
    else:
        sizes = online.support.sum(-1)
        assert torch.equal(online.support, cached.support) and sizes.min() >= 1 and len(sizes.unique()) > 2
