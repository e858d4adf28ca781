"""Alignment across tokenizers (ted_ds.crosstok) on hand-made spans and real tokenizers, and the two
cross-tokenizer losses: gradients against plain autograd, and equal to their one-tokenizer counterparts
when both sides share a tokenizer."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from harness.common import corpus_lines
from ted_ds.crosstok import AlignmentError, Chunk, CrossTokenizer, shared_chunks, shared_vocabulary, student_spans
from ted_ds.losses import (
    ObjectiveWeights,
    binary_kl,
    chunk_layer_loss,
    chunk_likelihood_loss,
    cross_tokenizer_objective,
    distill_objective,
    kd_loss,
    target_logprobs,
)


def chunks(student, teacher, length, ends=()):
    return [(c.student_start, c.student_end, c.teacher_start, c.teacher_end)
            for c in shared_chunks(student, teacher, length, ends)]


def test_merged_digits_are_one_chunk_on_each_side():
    # "1984": the student splits digits, the teacher merges pairs
    assert chunks([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (2, 4)], 4) == [(0, 2, 0, 1), (2, 4, 1, 2)]


def test_whitespace_left_out_of_offsets_still_aligns_and_a_different_cut_does_not():
    # "a cat": the student's " cat" holds the space, the teacher's offsets leave it out (a gap [1, 2])
    assert chunks([(0, 1), (1, 5)], [(0, 1), (2, 5)], 5) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    # the student's "a " holds it instead: the teacher may cut anywhere in its gap, after the space too
    assert chunks([(0, 2), (2, 5)], [(0, 1), (2, 5)], 5) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    # the teacher's "a " ends after the space: no boundary in common inside the text
    assert chunks([(0, 1), (1, 5)], [(0, 2), (2, 5)], 5) == [(0, 2, 0, 2)]


def test_a_character_in_bytes_stays_whole_on_both_sides():
    # "é!": the student's byte tokens (the first adds no text yet), the teacher's overlap on one character
    assert chunks([(0, 0), (0, 1), (1, 2)], [(0, 1), (0, 1), (1, 2)], 2) == [(0, 2, 0, 2), (2, 3, 2, 3)]
    # a window ending inside a character: its last byte is in no chunk
    assert chunks([(0, 1), (1, 1)], [(0, 1)], 1) == [(0, 1, 0, 1)]


def test_an_unknown_character_aligns_with_the_bytes_that_spell_it():
    # "a日b": the teacher's <unk> covers 日, the student spells it in three byte tokens
    student = [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3)]
    assert chunks(student, [(0, 1), (1, 2), (2, 3)], 3) == [(0, 1, 0, 1), (1, 4, 1, 2), (4, 5, 2, 3)]


def test_a_chunk_spanning_a_document_boundary_is_refused():
    # "ab|cd", the documents meet at character 2; the teacher's "bc" spans it
    with pytest.raises(AlignmentError, match="document boundary at character 2"):
        shared_chunks([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 1), (1, 3), (3, 4)], 4, (2,))
    assert chunks([(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (2, 4)], 4, (2,)) == [(0, 2, 0, 1), (2, 4, 1, 2)]


@pytest.fixture(scope="module")
def toks(sp_tokenizer, gpt2_tokenizer):
    from data_prep.tokenizer import load_tokenizer

    return load_tokenizer(sp_tokenizer), load_tokenizer(gpt2_tokenizer)


def test_a_window_of_two_documents_aligns_them_apart_with_their_eos_as_one_chunk(toks):
    sp, gpt2 = toks
    first, second = "The year 1984 cost 12,345€ — naïve.", "Second 42."
    encode = lambda text: sp(text, add_special_tokens=False).input_ids
    ids = encode(first) + [sp.eos_token_id] + encode(second)
    text, spans = student_spans(sp.backend_tokenizer, ids[:ids.index(sp.eos_token_id)])
    assert text == first and spans[-1][1] == len(first)
    t_ids, got = CrossTokenizer(sp, gpt2).window(ids)
    assert t_ids == (gpt2(first, add_special_tokens=False).input_ids + [gpt2.eos_token_id]
                     + gpt2(second, add_special_tokens=False).input_ids)
    pieces = [(sp.convert_ids_to_tokens(ids[c.student_start:c.student_end]),
               gpt2.convert_ids_to_tokens(t_ids[c.teacher_start:c.teacher_end])) for c in got]
    assert (["▁", "1", "9"], ["Ġ19"]) in pieces and (["8"], ["8"]) in pieces  # digits split, merged
    assert (["<0xE2>", "<0x82>", "<0xAC>"], ["â", "Ĥ", "¬"]) in pieces  # € in bytes on both sides, whole
    eos = ids.index(sp.eos_token_id)
    assert Chunk(eos, eos + 1, t_ids.index(gpt2.eos_token_id), t_ids.index(gpt2.eos_token_id) + 1) in got
    assert all(c.student_end <= eos or c.student_start > eos for c in got if c.student_start != eos)


def test_the_teachers_tokens_are_cut_at_its_positions_with_the_chunks_past_them(toks):
    sp, gpt2 = toks
    windows = torch.tensor([sp(line, add_special_tokens=False).input_ids[:17] for line in corpus_lines(2, 20)])
    full = CrossTokenizer(sp, gpt2).batch(windows[:, :-1], windows[:, 1:])
    cut = CrossTokenizer(sp, gpt2, max_positions=6).batch(windows[:, :-1], windows[:, 1:])
    assert full.input_ids.shape[1] > 6 and cut.input_ids.shape[1] == 6
    assert torch.equal(cut.input_ids, full.input_ids[:, :6])
    ends = [full.teacher_chunk.eq(k).nonzero()[:, 1].max().item() for k in range(full.chunks)]
    assert cut.chunks == sum(end < 6 for end in ends) < full.chunks  # only whole chunks stay


def word_level():
    """A tokenizer of whole words "a", "b", "c" (anything else <unk>), of neither family overlap_kl reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["a b c"], trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>")


def test_a_chunk_holding_the_teachers_unknown_token_is_left_out(toks, tmp_path):
    teacher = word_level()
    sp = toks[0]
    ids = sp("a 日 b", add_special_tokens=False).input_ids
    t_ids, got = CrossTokenizer(sp, teacher).window(ids)
    assert t_ids == [teacher.convert_tokens_to_ids(t) for t in ("a", "<unk>", "b")]
    assert [(c.teacher_start, c.teacher_end) for c in got] == [(0, 1), (2, 3)]


def loaded(sp_tokenizer, gpt2_tokenizer, tmp_path, manifest=None, rows=1200, **teacher):
    """load_cross_tokenizer for data whose tokenizer is ``sp_tokenizer`` and a GPT-2 teacher of ``rows``."""
    import shutil

    from transformers import GPT2Config

    from ted_ds.config import run_config_from_dict
    from ted_ds.crosstok import load_cross_tokenizer

    shutil.copytree(sp_tokenizer, tmp_path / "data" / "tokenizer")
    cfg = run_config_from_dict({
        "teacher": {"path": gpt2_tokenizer, **teacher}, "student": {"config": "s"},
        "data": {"path": str(tmp_path / "data")}, "train": {"steps": 1},
        "distill": {"method": "kd", "cross_tokenizer": "overlap_kl"}})
    return load_cross_tokenizer(cfg, manifest or {}, GPT2Config(vocab_size=rows, n_positions=64))


def test_loading_both_tokenizers_refuses_bos_shards_and_a_teacher_short_of_rows(sp_tokenizer, gpt2_tokenizer,
                                                                                 tmp_path):
    from ted_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="was built with --add-bos; rebuild it without"):
        loaded(sp_tokenizer, gpt2_tokenizer, tmp_path / "a", {"add_bos": True})
    with pytest.raises(ConfigError, match="1100 embedding rows cannot hold its tokenizer's 1200 ids"):
        loaded(sp_tokenizer, gpt2_tokenizer, tmp_path / "b", rows=1100)
    # teacher.tokenizer names the teacher's tokenizer when its directory has none
    cross = loaded(sp_tokenizer, str(tmp_path), tmp_path / "c", tokenizer=gpt2_tokenizer)
    assert len(cross.teacher) == 1200 and cross.max_positions == 64


def test_overlap_kl_refuses_a_vocabulary_of_neither_family(toks):
    from ted_ds.errors import ConfigError

    teacher = word_level()
    with pytest.raises(ConfigError, match="reads byte-level BPE and SentencePiece vocabularies"):
        shared_vocabulary(toks[0], teacher)


def test_surface_forms_read_byte_level_pieces_as_bytes_and_an_added_token_as_its_text(gpt2_tokenizer):
    from data_prep.tokenizer import load_tokenizer
    from ted_ds.crosstok import surface_forms

    gpt2 = load_tokenizer(gpt2_tokenizer)
    gpt2.add_tokens(["日本"])
    forms = surface_forms(gpt2)
    assert forms[gpt2.convert_tokens_to_ids("Ġthe")] == b" the"
    assert forms[gpt2.convert_tokens_to_ids("日本")] == "日本".encode()


B, L, V = 3, 24, 40


def aligned_windows(sp):
    """Three windows that start documents, each re-tokenized to the very same ids, and their view."""
    rows = [sp(line, add_special_tokens=False).input_ids[:L + 1] for line in corpus_lines(3, 10)]
    windows = torch.tensor(rows)
    view = CrossTokenizer(sp, sp).batch(windows[:, :-1], windows[:, 1:])
    assert torch.equal(view.input_ids, windows[:, :-1]) and view.chunks == B * L  # every token its own chunk
    return windows[:, :-1], windows[:, 1:], view


def test_binary_kl_by_hand():
    # P = 1/2, Q = 1/4: ½·ln 2 + ½·ln(2/3)
    want = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert binary_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(want)
    assert binary_kl(torch.tensor(-1e-9), torch.tensor(-1e-9)).item() == 0.0  # held below 0: finite


def test_with_one_tokenizer_chunk_likelihood_is_the_binary_kl_of_each_next_tokens_probability(toks):
    input_ids, labels, view = aligned_windows(toks[0])
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(B, L, 1000, generator=gen), torch.randn(B, L, 1000, generator=gen)
    direct = binary_kl(F.log_softmax(t, -1).gather(-1, labels[..., None]) / 2.0,
                       F.log_softmax(s, -1).gather(-1, labels[..., None]) / 2.0).mean()
    torch.testing.assert_close(chunk_likelihood_loss(s, labels, t, view, 2.0), direct)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_with_one_tokenizer_overlap_kl_is_kd(toks, divergence):
    sp = toks[0]
    _, labels, view = aligned_windows(sp)
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(B, L, 1000, generator=gen), torch.randn(B, L, 1000, generator=gen)
    w = ObjectiveWeights(1.0, 0.0, 2.0, "mse", 1000, divergence)
    got = cross_tokenizer_objective(s, labels, t, view, w, shared_vocabulary(sp, sp))["overlap_kl"]
    torch.testing.assert_close(got, kd_loss(s, t, labels, 2.0, divergence=divergence))


def test_target_logprobs_and_chunk_likelihood_gradients_match_autograd():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(B, L, V, generator=gen, requires_grad=True)
    t = torch.randn(B, 30, V, generator=gen)
    labels, t_labels = torch.randint(V, (B, L), generator=gen), torch.randint(V, (B, 30), generator=gen)
    labels[0, 3] = -100
    rows = target_logprobs(s.flatten(0, 1), labels.flatten(), chunk_tokens=7)
    want = torch.where(labels.flatten() >= 0, F.log_softmax(s, -1).flatten(0, 1).gather(
        1, labels.flatten().clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(rows, want)
    weights = torch.randn(B * L, generator=gen)
    g_rows, = torch.autograd.grad((rows * weights).sum(), s)
    g_want, = torch.autograd.grad((want * weights).sum(), s)
    torch.testing.assert_close(g_rows, g_want)

    s_chunk = torch.randint(-1, 9, (B, L), generator=gen)  # 9 chunks over the batch, some positions in none
    t_chunk = torch.randint(-1, 9, (B, 30), generator=gen)
    view = type("View", (), dict(student_chunk=s_chunk, teacher_chunk=t_chunk, chunks=9, labels=t_labels))
    got = chunk_likelihood_loss(s, labels, t, view, 1.5)

    def reference(logits, lab, chunk):
        rows = F.log_softmax(logits, -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0] * (lab >= 0)
        kept = chunk >= 0
        return torch.zeros(9).index_add(0, chunk[kept], rows[kept])

    want = binary_kl(reference(t, t_labels, t_chunk) / 1.5, reference(s, labels, s_chunk) / 1.5).sum() / 9
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


def test_overlap_kl_reads_the_shared_ids_at_single_token_chunks_with_autograds_gradient():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(B, L, V, generator=gen, requires_grad=True)
    t = torch.randn(B, 30, V + 5, generator=gen)
    shared = torch.tensor([0, 3, 7, 11]), torch.tensor([2, 3, 40, 1])
    singles = torch.tensor([0, 5, 30, 71]), torch.tensor([1, 2, 50, 89])
    view = type("View", (), dict(student_single=singles[0], teacher_single=singles[1]))
    got = cross_tokenizer_objective(s, torch.zeros(B, L, dtype=torch.long), t, view,
                                    ObjectiveWeights(0.5, 0.0, 2.0, "mse", V), shared)
    q = F.log_softmax(s.flatten(0, 1)[singles[0]][:, shared[0]] / 2.0, -1)
    p = F.log_softmax(t.flatten(0, 1)[singles[1]][:, shared[1]] / 2.0, -1)
    want = 4.0 * (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(got["overlap_kl"], want)
    torch.testing.assert_close(torch.autograd.grad(got["overlap_kl"], s)[0], torch.autograd.grad(want, s)[0])


@pytest.mark.parametrize("kind", ["mse", "normalized_mse", "cosine"])
def test_with_one_tokenizer_the_chunk_pooled_layer_loss_is_teds_layer_loss(toks, kind):
    _, labels, view = aligned_windows(toks[0])
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(B, L, 1000, generator=gen), torch.randn(B, L, 1000, generator=gen)
    s_taps, t_taps = [torch.randn(B, L, 8, generator=gen) for _ in range(2)], [torch.randn(B, L, 8, generator=gen)
                                                                                for _ in range(2)]
    w = ObjectiveWeights(1.0, 0.7, 2.0, kind, 1000)
    got = cross_tokenizer_objective(s, labels, t, view, w, None, s_taps, t_taps)
    want = distill_objective(s, s_taps, labels, t, t_taps, w)
    torch.testing.assert_close(got["layer"], want["layer"])
    torch.testing.assert_close(got["loss"], got["lm"] + got["chunk_likelihood"] + 0.7 * want["layer"])


@pytest.mark.parametrize("kind", ["mse", "normalized_mse", "cosine"])
def test_the_chunk_pooled_layer_loss_and_its_gradient_match_a_direct_formulation(kind):
    gen = torch.Generator().manual_seed(5)
    s_chunk = torch.randint(-1, 9, (B, L), generator=gen)  # 9 chunks over the batch, some positions in none
    t_chunk = torch.randint(-1, 9, (B, 30), generator=gen)
    s_chunk[0, :9] = t_chunk[0, :9] = torch.arange(9)  # every chunk on both sides
    view = type("View", (), dict(student_chunk=s_chunk, teacher_chunk=t_chunk, chunks=9))
    s = [torch.randn(B, L, 6, generator=gen, requires_grad=True) for _ in range(2)]
    t = [torch.randn(B, 30, 6, generator=gen) for _ in range(2)]

    def pooled(states, chunk):  # each chunk's mean as a (chunks × positions) averaging matrix
        member = (chunk.flatten()[None, :] == torch.arange(9)[:, None]).float()
        return (member / member.sum(1, keepdim=True)) @ states.flatten(0, 1)

    def distance(a, b):
        if kind == "cosine":
            return 1 - (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean()
        mse = ((a - b) ** 2).mean()
        return mse / (b.var() + 1e-6) if kind == "normalized_mse" else mse

    got = chunk_layer_loss(s, t, view, kind)
    want = sum(distance(pooled(a, s_chunk), pooled(b, t_chunk)) for a, b in zip(s, t)) / 2
    torch.testing.assert_close(got, want)
    for g, w_ in zip(torch.autograd.grad(got, s), torch.autograd.grad(want, s)):
        torch.testing.assert_close(g, w_)


def test_target_bytes_are_the_texts_bytes_whatever_the_tokenizer(toks):
    """A window's targets count the UTF-8 bytes of the text they spell, an EOS one byte: the same text is the
    same bytes in SentencePiece and byte-level BPE (bits per byte compares their models); the first token
    is context, a SentencePiece word after it keeps its space."""
    from ted_ds.evaluate import target_bytes

    first, second = "héllo wörld", "€5"  # 13 and 4 bytes
    for tok in toks:
        first_ids, second_ids = (tok(text, add_special_tokens=False).input_ids for text in (first, second))
        assert target_bytes(tok, [tok.eos_token_id, *first_ids, tok.eos_token_id, *second_ids]) == 18
    sp = toks[0]
    ids = sp("Hello there", add_special_tokens=False).input_ids
    assert sp.convert_ids_to_tokens(ids[2:]) == ["o", "▁there"] and target_bytes(sp, ids[2:]) == len(" there")


def test_the_trainers_eval_reports_bits_per_byte_of_the_held_out_text(tiny):
    """A model uniform over V ids scores ln V nats per token: the eval's bits per byte is tokens × log2 V over
    the bytes its windows' targets spell, whatever the micro-batches."""
    from types import SimpleNamespace

    from data_prep.tokenizer import load_tokenizer
    from ted_ds.data import PackedShardDataset
    from ted_ds.evaluate import target_bytes, window_bytes
    from ted_ds.trainer import evaluate

    valid = PackedShardDataset(tiny["llama_data"], "valid", 32)
    tok = load_tokenizer(os.path.join(tiny["llama_data"], "tokenizer"))
    uniform = SimpleNamespace(engine=torch.nn.Identity(), eval_loss=lambda x, y: torch.tensor(math.log(1000.0)))
    nbytes = sum(target_bytes(tok, valid[i].tolist()) for i in range(3))
    loss, bpb = evaluate(uniform, valid, 3, 2, window_bytes(valid, tok))
    assert loss == pytest.approx(math.log(1000)) and bpb == pytest.approx(3 * 32 * math.log2(1000) / nbytes)
    assert evaluate(uniform, valid, 3, 2) == (pytest.approx(math.log(1000)), None)


def cross_config(tiny, tmp_path, **over) -> str:
    """KD across tokenizers: a fresh student of the tiny LLaMA's shape (SentencePiece) learns from the GPT-2
    teacher (byte-level BPE), the two sharing no tokenizer."""
    from harness.tiny import base_config, write_config

    cfg = base_config(tiny["llama_data"], tiny["gpt2_teacher"], str(tmp_path / "out"), **{
        "student.init_from_teacher": None, "student.config": tiny["llama_teacher"], "distill.method": "kd",
        "distill.teacher_every": None, "distill.student_every": None, "distill.cross_tokenizer": "chunk_likelihood",
        "train.steps": 10, "train.global_batch_size": 4, **over})
    return write_config(str(tmp_path / "cross.yaml"), **cfg)


@pytest.mark.parametrize("over, refused", [
    ({"distill.method": "lwd"}, "this run has distill.method lwd"),
    ({"teacher.cache": "c", "teacher.logits_topk": 4}, "this run has teacher.cache c"),
    ({"teacher.logits_topk": 4}, "this run has teacher.logits_topk 4"),
    ({"teacher.logits_sampling": "sampled"}, "this run has teacher.logits_sampling sampled"),
    ({"data.document_attention": True}, "this run has data.document_attention True"),
    ({"distill.cross_tokenizer": None, "teacher.tokenizer": "t"}, "teacher.tokenizer is for distill.cross_tokenizer"),
    ({"distill.divergence": "jsd"}, "distill.divergence jsd is for overlap_kl: chunk_likelihood matches"),
])
def test_what_does_not_combine_with_cross_tokenizer_kd_is_refused_in_one_line(tiny, tmp_path, over, refused):
    from ted_ds.config import load_run_config
    from ted_ds.errors import ConfigError

    with pytest.raises(ConfigError, match=refused):
        load_run_config(cross_config(tiny, tmp_path, **over))


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_learning_filters_across_tokenizers_is_refused_in_one_line(tiny, tmp_path, side):
    """Stage 1 reads one tokenizer: each side learns its filters with a config of its own tokens."""
    from ted_ds.config import load_run_config
    from ted_ds.errors import ConfigError
    from ted_ds.plan import Job, plan

    cfg = load_run_config(cross_config(tiny, tmp_path, **{"distill.method": "ted"}))
    with pytest.raises(ConfigError, match=f"learn-filters --model {side} reads one tokenizer"):
        plan(cfg, Job.learning_filters_of(side))


def test_the_plan_loads_both_tokenizers_and_the_vocabulary_they_share(tiny, tmp_path):
    from ted_ds.config import load_run_config
    from ted_ds.plan import plan

    p = plan(load_run_config(cross_config(tiny, tmp_path, **{"distill.cross_tokenizer": "overlap_kl"})))
    student_ids, teacher_ids = p.cross.shared
    assert len(p.cross.student) == 1000 and len(p.cross.teacher) == 1200 and p.cross.max_positions == 128
    assert 100 < len(student_ids) < 1000 and len(student_ids) == len(teacher_ids)
    pieces = dict(zip(p.cross.student.convert_ids_to_tokens(student_ids.tolist()),
                      p.cross.teacher.convert_ids_to_tokens(teacher_ids.tolist())))
    assert pieces["▁the"] == "Ġthe" and pieces["</s>"] == "<|endoftext|>"


@pytest.mark.slow
def test_a_cross_tokenizer_kd_run_trains_its_student_on_the_teachers_tokens(tiny, tmp_path):
    import json
    import math
    import subprocess
    import sys

    from harness.common import REPO

    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", cross_config(tiny, tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    total = [row["loss/total"] for row in rows if "loss/total" in row]
    cross = [row["loss/chunk_likelihood"] for row in rows if "loss/total" in row]
    assert len(cross) == 10 and all(math.isfinite(x) and x > 0 for x in cross)
    assert sum(total[-3:]) < sum(total[:3]) and sum(cross[-3:]) < sum(cross[:3]), (total, cross)
    from data_prep.tokenizer import load_tokenizer
    from ted_ds.evaluate import evaluate_hf

    hf = str(tmp_path / "out" / "hf")  # the student keeps its own tokenizer, and ted-ds eval's bits per byte
    assert load_tokenizer(hf).get_vocab() == load_tokenizer(os.path.join(tiny["llama_data"], "tokenizer")).get_vocab()
    trained = [row["eval/bits_per_byte"] for row in rows if "eval/bits_per_byte" in row]
    scored = evaluate_hf(hf, tiny["llama_data"], seq_len=32, max_samples=8, progress=False)
    assert len(trained) == 1 and scored["bits_per_byte"] == pytest.approx(trained[0], rel=1e-4)
