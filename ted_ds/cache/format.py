"""The teacher cache on disk, in one place: what ``ted-ds cache-teacher`` writes and training reads.

A cache directory holds, per data source and split, blocks of ``block_windows`` consecutive windows::

    manifest.json                 written last: the identity below + every file's bytes and sha256
    build.json                    written first (the identity and layout): a re-run resumes that build
    <source>/<split>-NNNNN.bin    block NNNNN of a split: its windows NNNNN·block_windows, …

``<source>`` is the first 12 hex digits of the sha256 of the source's ``manifest.json`` (the data's own
identity: a cache serves any run over those shards, whatever it names them, blends or weighs them).
Window ``j`` of a split is ``ted_ds.data.PackedShardDataset``'s window ``j``, tokens ``[j·L, j·L + L + 1)``;
the teacher reads its first ``L = seq_len`` and the cache keeps, at each of the ``L`` positions, its ``k``
largest logits (before temperature, cut to the tokenizer's ids, largest first, rounded to ``value_dtype``
by ``ted_ds.teacher.teacher_logits``) and their ids, and — when the manifest's ``tail_temperature`` is a
number (a cache for top-k KD's tail form, the default) — one value more: the tail logit
T·log Σ_{i∉K} exp(z_i/T) at that temperature, the teacher's mass off its top-k. A training run's sample
index (what the sampler deals, a ``BlendedDataset`` index) is its source's offset plus the window's index in
that source's train split.

A block file, little-endian::

    "TEDLOGC1" (8 bytes) | n: uint64 | offsets: (n + 1) × uint64, offsets[0] = 0 | n zstd frames

frame ``w`` is bytes ``[h + offsets[w], h + offsets[w + 1])`` with ``h = 16 + 8·(n + 1)``, and decompresses to

* values, ``2·L·v`` bytes (``v = k + 1`` with a tail logit, else ``k``): the low bytes of ``L·v`` uint16
  codes, then their high bytes (row-major (L, v)).
  A 16-bit float with bits ``x`` has the key ``x | 0x8000`` if its sign is clear, else ``~x``: keys ascend
  with the values. Per position ``code[0] = key[0]`` and ``code[j] = key[j−1] − key[j] mod 2^16``: small
  numbers, since the values are sorted (the tail logit, last, need not be: the codes are exact mod 2^16
  either way) — what makes zstd worth running;
* ids, ``ceil(L·k·b / 8)`` bytes: each id in ``b = id_bits`` bits, most significant bit first, with no
  gaps (``numpy.packbits`` order), row-major (L, k).

Format ``ted-cache/1`` (no ``tail_temperature``, no tail logit) is still read, for the renormalized form
only; a tail-form run refuses it in one line.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import zstandard

from data_prep.errors import UserError
from data_prep.fileio import atomically, write_text
from data_prep.format import MANIFEST as DATA_MANIFEST
from data_prep.format import file_sha256

FORMAT = "ted-cache/2"
READS = (FORMAT, "ted-cache/1")  # 1: top-k values and ids alone, as the renormalized form reads them
MAGIC = b"TEDLOGC1"
MANIFEST = "manifest.json"
BUILD_SPEC = "build.json"
ZSTD_LEVEL = 3
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def id_bits(vocab: int) -> int:
    """Bits that hold every id below ``vocab`` (17 for 128k)."""
    return max(1, (vocab - 1).bit_length())


def source_key(data_dir: str) -> tuple[str, str]:
    """(directory name in a cache, sha256 of the data's manifest.json) of a ``ted-prep build`` directory."""
    digest = file_sha256(os.path.join(data_dir, DATA_MANIFEST))
    return digest[:12], digest


def block_name(key: str, split: str, index: int) -> str:
    return f"{key}/{split}-{index:05d}.bin"


# ----------------------------------------------------------------------------- one window
def encode_window(values: np.ndarray, ids: np.ndarray, bits: int) -> bytes:
    """One window's frame: ``values`` (L, v) uint16 bit patterns of 16-bit floats sorted largest first per
    row (but a last tail logit), ``ids`` (L, k) below 2^bits."""
    keys = np.where(values & 0x8000, ~values, values | 0x8000).astype(np.uint16)
    codes = keys.copy()
    codes[:, 1:] = keys[:, :-1] - keys[:, 1:]  # uint16: modulo 2^16
    planes = codes.astype("<u2").view(np.uint8).reshape(-1, 2).T  # (2, L·v): low bytes, high bytes
    big_endian = ids.astype(">u4").view(np.uint8).reshape(-1, 4)
    packed = np.packbits(np.unpackbits(big_endian, axis=1)[:, 32 - bits:])
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(planes.tobytes() + packed.tobytes())


def decode_window(frame, rows: int, k: int, bits: int, tail: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``encode_window`` undone: (values (L, k + tail) uint16 bit patterns, ids (L, k) int64)."""
    raw = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), dtype=np.uint8)
    n, n_values = rows * k, rows * (k + tail)
    if raw.size != 2 * n_values + math.ceil(n * bits / 8):
        raise UserError(f"teacher cache: a window decodes to {raw.size} bytes, not the {rows}×{k} rows expected")
    codes = raw[:2 * n_values].reshape(2, n_values).T.copy().view("<u2").reshape(rows, k + tail)
    steps = codes.astype(np.uint16)
    steps[:, 1:] = np.negative(steps[:, 1:])
    keys = np.cumsum(steps, axis=1, dtype=np.uint16)
    values = np.where(keys & 0x8000, keys ^ 0x8000, ~keys).astype(np.uint16)
    bitrows = np.unpackbits(raw[2 * n_values:], count=n * bits).reshape(n, bits)
    full = np.zeros((n, 32), dtype=np.uint8)
    full[:, 32 - bits:] = bitrows
    ids = np.packbits(full, axis=1).view(">u4").reshape(rows, k).astype(np.int64)
    return values, ids


def to_bits(values: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A tensor of 16-bit float values (held in any float dtype) as their uint16 bit patterns in ``dtype``."""
    return values.to(dtype).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


# ----------------------------------------------------------------------------- one block
def write_block(path: str, frames: list[bytes]) -> None:
    """A finished block file, whole or not at all (``<path>.tmp`` until renamed)."""
    offsets = np.zeros(len(frames) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(f) for f in frames])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + np.uint64(len(frames)).astype("<u8").tobytes() + offsets.tobytes())
        for frame in frames:
            f.write(frame)


class Block:
    """A block file, memory-mapped: its frames by window."""

    def __init__(self, path: str):
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        n = int(self.data[8:16].view("<u8")[0]) if self.data.size >= 16 else -1
        if bytes(self.data[:8]) != MAGIC or n < 0 or self.data.size < 16 + 8 * (n + 1):
            raise UserError(f"{path}: not a teacher cache block (damaged)")
        self.offsets = self.data[16:16 + 8 * (n + 1)].view("<u8").astype(np.int64) + 16 + 8 * (n + 1)
        if self.offsets[-1] != self.data.size:
            raise UserError(f"{path}: holds {self.data.size} bytes, its index says {self.offsets[-1]} (damaged)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def frame(self, w: int) -> memoryview:
        return memoryview(self.data[self.offsets[w]:self.offsets[w + 1]])


# ----------------------------------------------------------------------------- the directory
def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt {what} ({e.msg})") from None


def write_manifest(cache_dir: str, spec: dict, files: dict[str, dict]) -> None:
    write_text(os.path.join(cache_dir, MANIFEST), json.dumps({**spec, "files": files}, indent=1, sort_keys=True))


def verify(cache_dir: str, checksums: bool = True) -> dict:
    """The manifest of a finished cache whose every file is there with its size (and sha256); one line
    naming the first missing or damaged file otherwise."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        unfinished = os.path.isfile(os.path.join(cache_dir, BUILD_SPEC))
        raise UserError(f"teacher.cache {cache_dir}: not a finished teacher cache (no {MANIFEST}"
                        f"{'; re-run ted-ds cache-teacher to finish it' if unfinished else ''})")
    manifest = read_json(path, "teacher cache manifest")
    if manifest.get("format") not in READS:
        raise UserError(f"{path}: format {manifest.get('format')!r}, this ted-ds reads {' and '.join(READS)}")
    for name, rec in sorted(manifest["files"].items()):
        file = os.path.join(cache_dir, name)
        if not os.path.isfile(file):
            raise UserError(f"teacher cache file {file} is missing (rebuild with ted-ds cache-teacher)")
        if os.path.getsize(file) != rec["bytes"]:
            raise UserError(f"teacher cache file {file}: {os.path.getsize(file)} bytes, manifest says "
                            f"{rec['bytes']} (damaged)")
        if checksums and file_sha256(file) != rec["sha256"]:
            raise UserError(f"teacher cache file {file}: sha256 differs from the manifest's (damaged)")
    return manifest


class CacheRows:
    """The teacher's top-k rows of a run's training samples, read from a verified cache: the sampler's
    index → (source, window) → block → one frame, decompressed on demand. ``tail``: the run reads top-k KD
    in the tail form (the cache's tail logit, at its temperature, follows the top-k values)."""

    def __init__(self, cache_dir: str, manifest: dict, keys: list[str], k: int, split: str = "train",
                 tail: bool = True):
        self.dir, self.manifest, self.keys, self.k, self.split = cache_dir, manifest, keys, k, split
        self.tail = tail
        sizes = [manifest["sources"][key]["splits"][split]["windows"] for key in keys]
        self.starts = np.cumsum([0, *sizes])
        self.dtype = VALUE_DTYPES[manifest["value_dtype"]]
        self.blocks: dict[str, Block] = {}

    def window(self, key: str, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(values (L, K [+ 1]) uint16 bits, ids (L, K)) of window ``j`` of source ``key``'s split."""
        m = self.manifest
        block, w = divmod(j, m["block_windows"])
        name = block_name(key, self.split, block)
        if name not in self.blocks:
            self.blocks[name] = Block(os.path.join(self.dir, name))
        return decode_window(self.blocks[name].frame(w), m["seq_len"], m["k"], m["id_bits"], has_tail(m))

    def read(self, samples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (B, L, k [+ 1]) in the cache's dtype, ids (B, L, k) int64) of these sample indices."""
        rows = []
        for i in samples:
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            rows.append(self.window(self.keys[s], i - int(self.starts[s])))
        values = torch.from_numpy(np.stack([v for v, _ in rows]).view(np.int16)).view(self.dtype)
        ids = torch.from_numpy(np.stack([ids[:, :self.k] for _, ids in rows]))
        if not self.tail:
            return values[..., :self.k], ids
        return fold_tail(values, self.k, self.manifest["tail_temperature"]), ids


def has_tail(manifest: dict) -> bool:
    """Whether the cache's windows hold a tail logit after their top-k values."""
    return manifest.get("tail_temperature") is not None


def fold_tail(values: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Top-k values and tail logit (…, K + 1) cut to a smaller k: the values past k join the tail,
    T·logsumexp of them at T (in fp32; the same numbers as the cache when k = K)."""
    if values.shape[-1] == k + 1:
        return values
    rest = values[..., k:].float() / temperature
    return torch.cat([values[..., :k].float(), temperature * rest.logsumexp(-1, keepdim=True)], -1)


# ----------------------------------------------------------------------------- matching a run
def identity(cfg, teacher_dir: str, data_manifest: dict, k: int) -> dict:
    """What a cache must share with a run (``cfg`` as the user wrote it: its teacher path and revision are
    recorded; the teacher is the ``weights.fingerprint`` of the weights in ``teacher_dir``)."""
    from ted_ds.weights import fingerprint

    t = cfg.teacher
    return {"format": FORMAT,
            "teacher": {"path": t.path, "revision": t.revision, "digest": fingerprint(teacher_dir)},
            "tokenizer": {"vocab_sha256": data_manifest["tokenizer"]["vocab_sha256"],
                          "vocab_size": data_manifest["vocab_size"]},
            "seq_len": cfg.data.seq_len, "k": k, "value_dtype": t.logits_dtype,
            "document_attention": cfg.data.document_attention, "tail_temperature": cfg.tail_temperature}


def mismatch(cache_dir: str, cache: dict, run: dict, sources: dict[str, tuple[str, str]]) -> str | None:
    """Why the cache ``cache`` (its manifest) cannot serve a run of identity ``run`` over ``sources``
    (key → (name, path)), in one line; None when it can."""
    there = f"teacher.cache {cache_dir}"
    have, want = cache["teacher"], run["teacher"]
    if have["digest"] != want["digest"]:
        return (f"{there} was made with another teacher ({have['path']}, weights digest {have['digest']}; "
                f"teacher.path {want['path']} has {want['digest']})")
    if cache["tokenizer"]["vocab_sha256"] != run["tokenizer"]["vocab_sha256"]:
        return f"{there} was made with another tokenizer than the data's (vocabulary sha256 differs)"
    for key, (name, path) in sources.items():
        if key not in cache["sources"]:
            made = ", ".join(f"{s['name']} ({s['path']})" for s in cache["sources"].values())
            return f"{there} holds no windows of data source {name} ({path}); it was made from {made}"
    if cache["seq_len"] != run["seq_len"]:
        return f"{there} holds windows of seq_len {cache['seq_len']}; this run has data.seq_len {run['seq_len']}"
    if cache["document_attention"] != run["document_attention"]:
        return (f"{there} was made with data.document_attention {str(cache['document_attention']).lower()}; "
                f"this run has {str(run['document_attention']).lower()}")
    if cache["value_dtype"] != run["value_dtype"]:
        return (f"{there} stores {cache['value_dtype']} logits; set teacher.logits_dtype: {cache['value_dtype']} "
                f"(this run rounds to {run['value_dtype']})")
    tail = run["tail_temperature"]
    if tail is not None and cache.get("tail_temperature") != tail:
        held = (f"its tail logits at temperature {cache['tail_temperature']:g}; this run has distill.temperature "
                f"{tail:g}" if has_tail(cache) else "no tail logits (made for the renormalized form)")
        return (f"{there} holds {held}: rebuild it with ted-ds cache-teacher, or set "
                "teacher.logits_topk_form: renormalized")
    if cache["k"] < run["k"]:
        return (f"{there} holds the top {cache['k']} logits per token; teacher.logits_topk {run['k']} asks for more "
                f"(set it ≤ {cache['k']} or rebuild the cache)")
    return None
