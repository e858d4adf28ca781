"""Distilling across tokenizers: one text, two tokenizations, and the chunks whose boundaries both share.

The student's window is its own token ids; its text is decoded token by token (``student_spans``), each
document apart (a window's documents are split at the student's EOS).  The teacher tokenizes each
document's text itself (``teacher_spans``, from the tokenizer's character offsets), and the two EOS
tokens between documents stand for one separator character of the window's text, so documents never mix.

Alignment (ALM, Minixhofer et al. 2025): a tokenization may *cut* the text between two tokens when no
token reaches past the next one's start; a cut may lie anywhere in the gap ``[reach, next start]`` (a
tokenizer that leaves whitespace out of its offsets leaves such gaps).  A shared cut is a cut of both
sides whose places overlap; the chunks are the token spans between consecutive shared cuts.  Tokens
overlapping on one character (byte fallback's offsets) never part; where several cuts fall on one place
(tokens of zero width: bytes of a character the next token completes) the first is shared, so those
tokens open the next chunk with the token that completes them, and bytes left incomplete at the end are
in no chunk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from data_prep.errors import UserError
from ted_ds.errors import ConfigError
from ted_ds.losses import IGNORE_INDEX

SEPARATOR = "\n"  # the one character each document boundary's EOS pair stands for in a window's text


class AlignmentError(UserError):
    """The two tokenizations cannot be aligned as asked (a token spans a document boundary)."""


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[student_start, student_end)`` of the student and ``[teacher_start, teacher_end)`` of the
    teacher spell the same characters."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int


def cuts(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int, int]]:
    """Where a tokenization may cut its text of ``length`` characters: ``(tokens before, lo, hi)``, the cut
    anywhere in characters ``[lo, hi]``; ``spans`` are each token's (start, end) character offsets."""
    out, reach = [], 0
    for i, (start, end) in enumerate(spans):
        if start >= reach:
            out.append((i, reach, start))
        reach = max(reach, end)
    return out + [(len(spans), reach, length)]


def shared_chunks(student: list[tuple[int, int]], teacher: list[tuple[int, int]], length: int,
                  document_ends: tuple[int, ...] = ()) -> list[Chunk]:
    """The chunks between consecutive cuts both tokenizations share (module docstring), in order.  Every
    position of ``document_ends`` must be such a cut, or the alignment is refused: a chunk would span two
    documents."""
    a, b = cuts(student, length), cuts(teacher, length)
    i = j = 0
    shared: list[tuple[int, int, int, int]] = []  # (student tokens, teacher tokens, lo, hi)
    while i < len(a) and j < len(b):
        (sa, lo_a, hi_a), (tb, lo_b, hi_b) = a[i], b[j]
        if hi_a < lo_b:
            i += 1
        elif hi_b < lo_a:
            j += 1
        else:
            shared.append((sa, tb, max(lo_a, lo_b), min(hi_a, hi_b)))
            i, j = i + 1, j + 1
    for end in document_ends:
        if not any(lo <= end <= hi for *_, lo, hi in shared):
            raise AlignmentError(f"a token spans the document boundary at character {end}: no chunk may hold "
                                 "two documents")
    return [Chunk(s0, s1, t0, t1) for (s0, t0, *_), (s1, t1, *_) in zip(shared, shared[1:])]


def student_spans(backend, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of one document's student ``ids`` and each token's character span in it, decoded a token at
    a time (``tokenizers.decoders.DecodeStream``): a token that adds no text yet (a byte of a character)
    is zero-width where the character will start."""
    from tokenizers.decoders import DecodeStream

    stream, text, spans = DecodeStream(skip_special_tokens=False), [], []
    at = 0
    for i in ids:
        piece = stream.step(backend, i) or ""
        spans.append((at, at + len(piece)))
        text.append(piece)
        at += len(piece)
    return "".join(text), spans


class TeacherView(NamedTuple):
    """One micro-batch as the teacher reads it, and the aligned chunks of both sides, in label positions
    (the position that predicts a token: its index − 1)."""

    input_ids: torch.Tensor  # (B, Tt): the teacher's tokens of each window's text but the last, EOS-padded
    labels: torch.Tensor  # (B, Tt): the teacher's next tokens, IGNORE_INDEX on padding
    student_chunk: torch.Tensor  # (B, L): each student label position's chunk (over the batch), −1: none
    teacher_chunk: torch.Tensor  # (B, Tt): likewise for the teacher's
    chunks: int  # chunks in the micro-batch
    student_single: torch.Tensor  # (P,): flat (B·L) student positions of chunks one token on both sides
    teacher_single: torch.Tensor  # (P,): the teacher's flat (B·Tt) positions of those chunks

    def to(self, device) -> TeacherView:
        return TeacherView(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in self))


class CrossTokenizer:
    """The teacher's view of student windows: its tokens of the same text and the chunks both share, read by
    a teacher of ``max_positions`` positions (None: any length); with ``overlap`` also the vocabulary both
    share (``shared_vocabulary``)."""

    def __init__(self, student_tok, teacher_tok, max_positions: int | None = None, overlap: bool = False):
        self.student, self.teacher = student_tok, teacher_tok
        self.max_positions = max_positions
        self.shared = shared_vocabulary(student_tok, teacher_tok) if overlap else None
        self.student_eos, self.teacher_eos = student_tok.eos_token_id, teacher_tok.eos_token_id
        # an unknown-token id that is also the EOS (GPT-2's) marks nothing unknown
        self.unknown = tuple(t.unk_token_id if t.unk_token_id != t.eos_token_id else None
                             for t in (student_tok, teacher_tok))

    def window(self, ids: list[int]) -> tuple[list[int], list[Chunk]]:
        """The teacher's tokens of a student window's text, and the chunks (token indices in the window and
        in the teacher's tokens); chunks holding an unknown token on either side are left out."""
        text, s_spans, t_ids, t_spans, ends = [], [], [], [], []
        at = 0
        for k, document in enumerate(split_documents(ids, self.student_eos)):
            if k:  # the EOS pair between two documents: one separator character on both sides
                s_spans.append((at, at + 1))
                t_ids.append(self.teacher_eos)
                t_spans.append((at, at + 1))
                text.append(SEPARATOR)
                ends += [at, at + 1]
                at += 1
            doc_text, spans = student_spans(self.student.backend_tokenizer, document)
            enc = self.teacher(doc_text, add_special_tokens=False, return_offsets_mapping=True)
            s_spans += [(at + a, at + b) for a, b in spans]
            t_ids += enc["input_ids"]
            t_spans += [(at + a, at + b) for a, b in enc["offset_mapping"]]
            text.append(doc_text)
            at += len(doc_text)
        chunks = shared_chunks(s_spans, t_spans, at, tuple(ends))
        return t_ids, [c for c in chunks if not self._unknown(ids, t_ids, c)]

    def _unknown(self, s_ids: list[int], t_ids: list[int], c: Chunk) -> bool:
        s_unk, t_unk = self.unknown
        return ((s_unk is not None and s_unk in s_ids[c.student_start:c.student_end])
                or (t_unk is not None and t_unk in t_ids[c.teacher_start:c.teacher_end]))

    def batch(self, input_ids: torch.Tensor, labels: torch.Tensor) -> TeacherView:
        """The ``TeacherView`` of a micro-batch of student windows ((B, L) inputs and labels)."""
        windows = torch.cat([input_ids, labels[:, -1:]], 1).tolist()  # (B, L + 1)
        views = [self.window(w) for w in windows]
        return teacher_view(views, input_ids.shape[1], self.teacher_eos, self.max_positions)


def split_documents(ids: list[int], eos: int) -> list[list[int]]:
    """A window's tokens between its EOS tokens (the EOS left out): one list per document, maybe empty."""
    out, current = [], []
    for i in ids:
        if i == eos:
            out.append(current)
            current = []
        else:
            current.append(i)
    return out + [current]


def teacher_view(views: list[tuple[list[int], list[Chunk]]], seq_len: int, pad: int,
                 max_positions: int | None = None) -> TeacherView:
    """The micro-batch's tensors from each window's (teacher ids, chunks); chunks whose first token starts a
    window (nothing predicts it) are left out, and so are those past the teacher's ``max_positions`` (its
    tokens are cut there); a chunk one token long on both sides is a single."""
    width = max(len(t_ids) for t_ids, _ in views) - 1
    width = width if max_positions is None else min(width, max_positions)
    b = len(views)
    t_in = torch.full((b, width), pad, dtype=torch.long)
    t_labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    s_chunk = torch.full((b, seq_len), -1, dtype=torch.long)
    t_chunk = torch.full((b, width), -1, dtype=torch.long)
    singles: list[tuple[int, int]] = []
    n = 0
    for row, (t_ids, chunks) in enumerate(views):
        t_ids = t_ids[:width + 1]
        t_in[row, :len(t_ids) - 1] = torch.tensor(t_ids[:-1])
        t_labels[row, :len(t_ids) - 1] = torch.tensor(t_ids[1:])
        for c in chunks:
            if c.student_start == 0 or c.teacher_start == 0 or c.teacher_end > width + 1:
                continue
            s_chunk[row, c.student_start - 1:c.student_end - 1] = n
            t_chunk[row, c.teacher_start - 1:c.teacher_end - 1] = n
            if c.student_end - c.student_start == 1 and c.teacher_end - c.teacher_start == 1:
                singles.append((row * seq_len + c.student_start - 1, row * width + c.teacher_start - 1))
            n += 1
    single = torch.tensor(singles, dtype=torch.long).reshape(-1, 2)
    return TeacherView(t_in, t_labels, s_chunk, t_chunk, n, single[:, 0].contiguous(), single[:, 1].contiguous())


def surface_forms(tok) -> dict[int, bytes]:
    """Each id's surface form, comparable across tokenizer families: the bytes its piece stands for (``▁`` and
    byte-level BPE's ``Ġ`` as the space they are; a SentencePiece byte piece ``<0xE2>`` and a special token as
    the text of their name, equal only to the same piece of another SentencePiece vocabulary)."""
    decoder = json.dumps(json.loads(tok.backend_tokenizer.to_str()).get("decoder"), ensure_ascii=False)
    if '"ByteLevel"' in decoder:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}  # an added token may hold other characters
        plain = lambda piece: bytes(byte_of[c] for c in piece) if set(piece) <= byte_of.keys() else piece.encode()
    elif "▁" in decoder:
        plain = lambda piece: piece.replace("▁", " ").encode()
    else:
        raise ConfigError(f"{tok.name_or_path}: distill.cross_tokenizer overlap_kl reads byte-level BPE and "
                          "SentencePiece vocabularies; this tokenizer's decoder is neither")
    return {i: plain(p) for p, i in tok.get_vocab().items()}


def shared_vocabulary(student_tok, teacher_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens both vocabularies hold with one surface form, in student id
    order, the two EOS tokens paired whatever they are called; a form held by two ids of one vocabulary is
    left out (it names no one token)."""
    def by_form(tok) -> dict:
        forms = surface_forms(tok)
        forms[tok.eos_token_id] = ("eos",)
        seen: dict = {}
        for i, form in forms.items():
            seen.setdefault(form, []).append(i)
        return {form: ids[0] for form, ids in seen.items() if len(ids) == 1}

    student, teacher = by_form(student_tok), by_form(teacher_tok)
    pairs = sorted((i, teacher[form]) for form, i in student.items() if form in teacher)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


def load_cross_tokenizer(cfg, manifest: dict, teacher_config) -> CrossTokenizer:
    """The run's ``CrossTokenizer`` (``distill.cross_tokenizer``), once the data's and the teacher's tokenizers
    load, the teacher's embedding holds its tokenizer's ids and no window holds a BOS."""
    from data_prep.tokenizer import load_tokenizer
    from ted_ds.architectures import max_positions, vocab_size

    t = cfg.teacher
    data_dir = cfg.data.blend[0].path
    if manifest.get("add_bos", False):
        raise ConfigError(f"distill.cross_tokenizer: {data_dir} was built with --add-bos; rebuild it without "
                          "(each document's text is re-tokenized for the teacher, a BOS inside a window has none)")
    student = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    teacher = load_tokenizer(t.tokenizer or t.path, t.trust_remote_code)
    if vocab_size(teacher_config) < len(teacher):
        raise ConfigError(f"teacher {t.path}: {vocab_size(teacher_config)} embedding rows cannot hold its "
                          f"tokenizer's {len(teacher)} ids ({teacher.name_or_path})")
    return CrossTokenizer(student, teacher, max_positions(teacher_config), cfg.distill.cross_tokenizer == "overlap_kl")
