"""The on-disk dataset format of a ``ted-prep build`` directory, in one place.

The writer (``data_prep.build``), the checker (``data_prep.verify``) and the readers (training's
``ted_ds.data``) all go through this module, so none of them needs the others: shard names, the
train/valid split rule, the manifest's fields, how it is read, and the checksums it records.

A finished directory holds ``manifest.json`` (below), ``build.json`` (the build spec, for resume),
``tokenizer/`` and per split the shards ``<split>-NNNNN.{bin,idx}`` (``data_prep.indexed``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from data_prep.errors import UserError

FORMAT = "ted-prep/1"
SPLITS = ("train", "valid")
MANIFEST = "manifest.json"
BUILD_SPEC = "build.json"
SPLIT_METHOD = "blake2b-64(key=seed, utf-8 text) / 2^64 < valid_fraction"


def split_of(text_bytes: bytes, seed: int, valid_fraction: float) -> str:
    """Deterministic train/valid assignment from a keyed hash of the document's own bytes."""
    if valid_fraction <= 0.0:
        return "train"
    digest = hashlib.blake2b(text_bytes, digest_size=8, key=_split_key(seed)).digest()
    return "valid" if int.from_bytes(digest, "little") < valid_fraction * 2.0**64 else "train"


@functools.lru_cache(maxsize=8)
def _split_key(seed: int) -> bytes:
    return seed.to_bytes(8, "little", signed=True)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_record(out: str, name: str, documents: int, tokens: int) -> dict:
    """The manifest's entry for one finished shard: counts, sizes and checksums of its two files."""
    prefix = os.path.join(out, name)
    record = {"name": name, "documents": documents, "tokens": tokens}
    for ext in ("bin", "idx"):
        record[f"{ext}_bytes"] = os.path.getsize(f"{prefix}.{ext}")
        record[f"{ext}_sha256"] = file_sha256(f"{prefix}.{ext}")
    return record


def make_manifest(tokenizer: dict, dtype: str, index_codes: str, add_bos: bool, valid_fraction: float, seed: int,
             sources: list[dict], shards: dict, stats: dict, options: dict) -> dict:
    """The manifest of a finished build; ``shards`` maps each split to its ``shard_record``s."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "vocab_size": tokenizer["vocab_size"],
        "dtype": dtype,
        "index_codes": index_codes,
        "eos_token_id": tokenizer["eos_token_id"],
        "add_bos": add_bos,
        "split": {"method": SPLIT_METHOD, "valid_fraction": valid_fraction, "seed": seed},
        "sources": sources,
        "shards": shards,
        "totals": {s: {"documents": sum(r["documents"] for r in shards[s]),
                       "tokens": sum(r["tokens"] for r in shards[s])} for s in SPLITS},
        "stats": stats,
        "options": options,
    }


def read_manifest(data_dir: str) -> dict:
    """The manifest of a finished build; one clear line when ``data_dir`` is not one."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        hint = " (an unfinished build: re-run ted-prep build to finish it)" if os.path.isfile(
            os.path.join(data_dir, BUILD_SPEC)) else ""
        raise UserError(f"{data_dir} is not a ted-prep dataset: no manifest.json{hint}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt manifest ({e.msg})") from None
