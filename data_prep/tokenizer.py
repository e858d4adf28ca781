"""Tokenizers: load any HF tokenizer directory, fingerprint it, encode batches, train SentencePiece."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

import numpy as np

from data_prep.errors import UserError

# Files that define a tokenizer; weights and model configs in the same directory are not hashed.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json",
)


class TokenizerDir:
    """A ``tokenizer.json`` directory read with the ``tokenizers`` library alone.

    Enough for building shards (ids, special tokens, vocabulary, a copy of the files) without
    importing transformers and torch: start-up drops from seconds to a tenth of one, and every
    forked worker is ~200 MB smaller.  Directories it cannot read fully go through ``AutoTokenizer``.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name_or_path = path
        self.backend_tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            full = os.path.join(path, name)
            if os.path.isfile(full):
                with open(full) as f:
                    config.update(json.load(f))
        self.tokenizer_class = config.get("tokenizer_class", "PreTrainedTokenizerFast")
        ids = {}
        for role in ("eos", "bos", "unk"):
            token = config.get(f"{role}_token")
            if isinstance(token, dict):
                token = token.get("content")
            ids[role] = self.backend_tokenizer.token_to_id(token) if isinstance(token, str) else None
        self.eos_token_id, self.bos_token_id, self.unk_token_id = ids["eos"], ids["bos"], ids["unk"]

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def save_pretrained(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(self.name_or_path, name)):
                shutil.copy2(os.path.join(self.name_or_path, name), out_dir)


def load_tokenizer_for_build(path: str):
    """The light ``TokenizerDir`` when the directory allows it, else the full HF tokenizer; either
    way checked to turn text into tokens."""
    tok = _light_tokenizer(path)
    if tok is None:
        tok = load_tokenizer(path)
    check_encodes_text(tok, path)
    return tok


def _light_tokenizer(path: str) -> TokenizerDir | None:
    """``TokenizerDir`` if the directory has a ``tokenizer.json`` it reads fully, else None."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    try:
        tok = TokenizerDir(path)
    except Exception:  # an unusual tokenizer.json: let transformers judge it
        return None
    return tok if tok.eos_token_id is not None and len(tok) > 0 else None


PROBE_TEXT = "The quick brown fox jumps over the lazy dog; 1,024 tokens per sample."


def check_encodes_text(tok, path: str) -> None:
    """A tokenizer that maps plain English to nothing, or to nothing but <unk>, would make shards of
    bare EOS tokens without any error (a failed conversion can leave a 3-entry vocabulary)."""
    ids = BatchEncoder(tok, np.int64).ids([PROBE_TEXT])[0]
    if not ids or all(i == tok.unk_token_id for i in ids):
        what = "no tokens" if not ids else "only the unknown token"
        raise UserError(f"tokenizer {path} turns plain English text into {what} (vocabulary of {len(tok)}); "
                        "it is broken or incomplete — check how it was converted or saved")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load an HF tokenizer directory, or fail with one line saying why."""
    if not os.path.isdir(path):
        raise UserError(f"tokenizer directory not found: {path}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a bad directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tokenizer directory {path} does not load: {first}") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {path} has no EOS token; documents need one as separator")
    return tok


def vocab_fingerprint(tok) -> str:
    """Hash of the token→id mapping and special ids: equal fingerprints tokenize identically enough
    to share a vocabulary, even when the files were re-saved with different metadata."""
    h = hashlib.sha256()
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    h.update(f"eos={tok.eos_token_id} bos={tok.bos_token_id} unk={tok.unk_token_id}".encode())
    return h.hexdigest()


def files_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            h.update(name.encode() + b"\0")
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def tokenizer_identity(path: str, tok) -> dict:
    """What manifest.json and checkpoints record to tell tokenizers apart."""
    return {
        "name": os.path.basename(os.path.normpath(getattr(tok, "name_or_path", path) or path)),
        "class": getattr(tok, "tokenizer_class", type(tok).__name__),
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "files_sha256": files_fingerprint(path),
        "vocab_sha256": vocab_fingerprint(tok),
    }


class BatchEncoder:
    """Turns a batch of texts into (concatenated token ids with EOS after each document, lengths).

    Uses the Rust backend directly when the tokenizer has one (no offsets, no Python objects per
    token); the result equals ``tok(text, add_special_tokens=False).input_ids + [eos]``, after
    ``[bos]`` when ``add_bos`` (the LLaMA convention: every document starts with BOS).
    """

    def __init__(self, tok, dtype: np.dtype, add_bos: bool = False):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.bos = [tok.bos_token_id] if add_bos else []
        self.dtype = np.dtype(dtype)
        backend = getattr(tok, "backend_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None) if backend is not None else None

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, ids in enumerate(self.ids(texts)):
            flat.extend(self.bos)
            flat.extend(ids)
            flat.append(self.eos)
            lengths[i] = len(self.bos) + len(ids) + 1
        return np.array(flat, dtype=self.dtype), lengths


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int, model_type: str,
                        max_sentences: int = 2_000_000) -> None:
    """Train a LLaMA-style SentencePiece model and write an ``AutoTokenizer``-loadable directory.

    LLaMA's settings: identity normalisation, whitespace kept, digits split, byte fallback, with
    ``<unk>``=0, ``<s>``=1, ``</s>``=2.  BPE models load as ``LlamaTokenizer``; unigram models as a
    ``PreTrainedTokenizerFast`` around the same normaliser and decoder with a Unigram model.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type must be bpe or unigram, not {model_type!r}")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, minloglevel=2, num_threads=os.cpu_count() or 1,
        )
    except RuntimeError as e:
        raise UserError(f"sentencepiece training failed: {str(e).strip().splitlines()[-1]}") from None
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)  # --out a/b/tok makes a/b, as `build --out` does
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create {parent} ({e.strerror})") from None
    tmp = tempfile.mkdtemp(prefix=".tok-", dir=parent)
    try:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(buf.getvalue())
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}, f)
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        tok = AutoTokenizer.from_pretrained(tmp)
        if model_type == "unigram":
            from tokenizers import models

            sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
            vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
            backend = tok.backend_tokenizer
            backend.model = models.Unigram(vocab, unk_id=0, byte_fallback=True)
            tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                          unk_token="<unk>")
        tok.save_pretrained(tmp)
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
