"""Shared fixtures: a small slice of the bundled corpus and two real tokenizers trained on it."""

from __future__ import annotations

import gzip
import os

import pytest

from data_prep.cli import SAMPLE_CORPUS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_lines(n: int, start: int = 0) -> list[str]:
    with gzip.open(SAMPLE_CORPUS, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[start:start + n]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """400 Wikipedia paragraphs, one per line."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    path.write_text("\n".join(corpus_lines(400)) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory) -> str:
    """A LLaMA-style SentencePiece BPE tokenizer (vocab 1000) trained by ted-prep itself."""
    from data_prep.tokenizer import train_sentencepiece

    out = str(tmp_path_factory.mktemp("tok") / "sp-bpe")
    train_sentencepiece(iter(corpus_lines(2000)), out, vocab_size=1000, model_type="bpe")
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> str:
    """A GPT-2-style byte-level BPE tokenizer (GPT2TokenizerFast, <|endoftext|>), trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(2000), vocab_size=1200, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    out = str(tmp_path_factory.mktemp("tok") / "gpt2-bpe")
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out
