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
VARIABLE_FORMAT = "ted-cache/3"  # a count of entries per token (top-p, sampled): frames as ``encode_variable``
READS = (VARIABLE_FORMAT, FORMAT, "ted-cache/1")  # 1: top-k values and ids alone, for the renormalized form
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
def _keys(values: np.ndarray) -> np.ndarray:
    """16-bit float bit patterns as keys that ascend with the values."""
    return np.where(values & 0x8000, ~values, values | 0x8000).astype(np.uint16)


def _values(keys: np.ndarray) -> np.ndarray:
    """``_keys`` undone."""
    return np.where(keys & 0x8000, keys ^ 0x8000, ~keys).astype(np.uint16)


def _decompressed(frame) -> np.ndarray:
    return np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), dtype=np.uint8)


def _check_size(raw: np.ndarray, size: int, rows: int, k: int) -> None:
    if raw.size != size:
        raise UserError(f"teacher cache: a window decodes to {raw.size} bytes, not the {rows}×{k} rows expected")


def encode_window(values: np.ndarray, ids: np.ndarray, bits: int) -> bytes:
    """One window's frame: ``values`` (L, v) uint16 bit patterns of 16-bit floats sorted largest first per
    row (but a last tail logit), ``ids`` (L, k) below 2^bits."""
    keys = _keys(values)
    codes = keys.copy()
    codes[:, 1:] = keys[:, :-1] - keys[:, 1:]  # uint16: modulo 2^16
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_planes(codes) + _pack_ids(ids, bits))


def decode_window(frame, rows: int, k: int, bits: int, tail: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``encode_window`` undone: (values (L, k + tail) uint16 bit patterns, ids (L, k) int64)."""
    n, n_values = rows * k, rows * (k + tail)
    raw = _decompressed(frame)
    _check_size(raw, 2 * n_values + math.ceil(n * bits / 8), rows, k)
    steps = _unplanes(raw, n_values).reshape(rows, k + tail)
    steps[:, 1:] = np.negative(steps[:, 1:])
    values = _values(np.cumsum(steps, axis=1, dtype=np.uint16))
    return values, _unpack_ids(raw[2 * n_values:], n, bits).reshape(rows, k)


def decode_variable(frame, rows: int, k: int, bits: int, tail: bool, sampled: bool):
    """``encode_variable`` undone: (values (L, k + tail) uint16 bit patterns, zero past each row's entries, and
    ids (L, k) int64, past them 0 (sampled) or the row's first id (top-p, as ``teacher_logits`` has them);
    kept (L,) int64; draws (L, k) int64, sampled, else None)."""
    raw = _decompressed(frame)
    kept = _unplanes(raw, rows).astype(np.int64) if raw.size >= 2 * rows else np.zeros(rows, np.int64)
    tail = int(tail)
    n, lengths = int(kept.sum()), kept + tail
    total = int(lengths.sum())
    _check_size(raw, 2 * rows + 2 * total + 2 * n * sampled + math.ceil(n * bits / 8), rows, k)
    steps = _unplanes(raw[2 * rows:], total)
    starts = _row_starts(lengths)
    steps[starts] = np.negative(steps[starts])  # undone by the negation of every step below
    sums = np.cumsum(np.negative(steps), dtype=np.uint16)
    keys = sums - np.repeat(np.concatenate([[0], sums])[starts], lengths).astype(np.uint16)  # per row
    on = np.arange(k)[None] < kept[:, None]
    values, ids = np.zeros((rows, k + tail), np.uint16), np.zeros((rows, k), np.int64)
    values[np.concatenate([on, np.ones((rows, tail), bool)], 1)] = _values(keys)
    at = 2 * rows + 2 * total
    draws = None
    if sampled:
        draws = np.zeros((rows, k), np.int64)
        draws[on], at = _unplanes(raw[at:], n), at + 2 * n
    ids[on] = _unpack_ids(raw[at:], n, bits)
    return values, ids if sampled else np.where(on, ids, ids[:, :1]), kept, draws


def _row_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each row begins in the rows laid end to end."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _planes(x: np.ndarray) -> bytes:
    """uint16 numbers as their low bytes, then their high bytes (what zstd packs best)."""
    return x.astype("<u2").view(np.uint8).reshape(-1, 2).T.tobytes()


def _unplanes(raw: np.ndarray, n: int) -> np.ndarray:
    return raw[:2 * n].reshape(2, n).T.copy().view("<u2").reshape(n).astype(np.uint16)


def _pack_ids(ids: np.ndarray, bits: int) -> bytes:
    big_endian = ids.astype(">u4").view(np.uint8).reshape(-1, 4)
    return np.packbits(np.unpackbits(big_endian, axis=1)[:, 32 - bits:]).tobytes()


def _unpack_ids(raw: np.ndarray, n: int, bits: int) -> np.ndarray:
    full = np.zeros((n, 32), dtype=np.uint8)
    full[:, 32 - bits:] = np.unpackbits(raw, count=n * bits).reshape(n, bits)
    return np.packbits(full, axis=1).view(">u4").reshape(n).astype(np.int64)


def encode_variable(values: np.ndarray, ids: np.ndarray, bits: int, kept: np.ndarray,
                    draws: np.ndarray | None = None) -> bytes:
    """One window's frame when tokens keep different numbers of entries (format ted-cache/3): ``kept`` (L,)
    the entries of each row, ``values`` (L, v) and ``ids`` (L, k) padded past them (v = k + 1: a last tail
    logit, kept always), ``draws`` (L, k) the sampled ids' counts. Only kept entries are stored::

        kept (2·L) | value codes (2·Σ(kept + v − k)) | draws (2·Σ kept, sampled) | ids (ceil(Σ kept·b / 8))

    uint16 as low bytes then high bytes; value codes as ``encode_window``'s, each row from its first kept value."""
    k = ids.shape[1]
    on = np.arange(k)[None] < kept[:, None]  # (L, k)
    value_on = np.concatenate([on, np.ones((len(kept), values.shape[1] - k), bool)], 1)
    keys = _keys(values)[value_on]
    codes = keys.copy()
    codes[1:] = keys[:-1] - keys[1:]
    starts = _row_starts(value_on.sum(1))
    codes[starts] = keys[starts]  # a row's first key stands alone (every row keeps at least one value)
    parts = [_planes(kept), _planes(codes)] + ([_planes(draws[on])] if draws is not None else [])
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(parts) + _pack_ids(ids[on], bits))


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


class BlockFile:
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
        self.blocks: dict[str, BlockFile] = {}

    def window(self, key: str, j: int) -> tuple:
        """(values (L, K [+ 1]) uint16 bits, ids (L, K), entries kept per row (L,) or None, draws (L, K) or
        None) of window ``j`` of source ``key``'s split; past a row's entries values and ids are 0."""
        m = self.manifest
        block, w = divmod(j, m["block_windows"])
        name = block_name(key, self.split, block)
        if name not in self.blocks:
            self.blocks[name] = BlockFile(os.path.join(self.dir, name))
        frame = self.blocks[name].frame(w)
        if m.get("format") == VARIABLE_FORMAT:
            return decode_variable(frame, m["seq_len"], m["k"], m["id_bits"], has_tail(m), m.get("samples") is not None)
        return (*decode_window(frame, m["seq_len"], m["k"], m["id_bits"], has_tail(m)), None, None)

    def read(self, samples: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values (B, L, k [+ 1]) in the cache's dtype, ids (B, L, k) int64, draws (B, L, k) or None) of these
        sample indices: as ``ted_ds.teacher.teacher_logits`` gives them (top-p: −inf past a token's support),
        or as ``ted_ds.teacher.sampled_logits`` does."""
        rows = [self.window(*locate(self.starts, self.keys, i)) for i in samples]
        values = torch.from_numpy(np.stack([r[0] for r in rows]).view(np.int16)).view(self.dtype)
        if rows[0][3] is not None:  # sampled: every draw is read
            stacked = (torch.from_numpy(np.stack([r[i] for r in rows])) for i in (1, 3))
            return values, *stacked
        ids = torch.from_numpy(np.stack([r[1][:, :self.k] for r in rows]))
        if rows[0][2] is not None:  # top-p: the entries past each token's support are −inf
            past = torch.from_numpy(np.stack([np.arange(self.manifest["k"])[None] >= r[2][:, None] for r in rows]))
            values[..., :past.shape[-1]].masked_fill_(past, -math.inf)
        if not self.tail:
            return values[..., :self.k], ids, None
        return fold_tail(values, self.k, self.manifest["tail_temperature"]), ids, None


def locate(starts: np.ndarray, keys: list[str], i: int) -> tuple[str, int]:
    """(source key, window in that source's split) of sample ``i``, the sources' windows laid end to end from
    ``starts``."""
    s = int(np.searchsorted(starts, i, side="right")) - 1
    return keys[s], i - int(starts[s])


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
    recorded; the teacher is the ``weights.fingerprint`` of the weights in ``teacher_dir``). A cache of
    samples records their number (its k) and seed; one of top-p its p."""
    from ted_ds.weights import fingerprint

    t = cfg.teacher
    sampled = t.logits_sampling == "sampled"
    variable = {"top_p": t.logits_top_p} if t.logits_top_p is not None else {}
    if sampled:
        k, variable = t.logits_samples, {"samples": t.logits_samples, "sampling_seed": cfg.train.seed,
                                         "sampling_temperature": cfg.distill.temperature}
    return {"format": VARIABLE_FORMAT if variable else FORMAT, **variable,
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
    why = _cut_mismatch(there, cache, run)
    if why:
        return why
    if cache["k"] < run["k"]:
        return (f"{there} holds the top {cache['k']} logits per token; teacher.logits_topk {run['k']} asks for more "
                f"(set it ≤ {cache['k']} or rebuild the cache)")
    return None


def _cut_mismatch(there: str, cache: dict, run: dict) -> str | None:
    """Why a cache's top-p or samples cannot serve the run's, in one line; None when they can."""
    for field, option in (("top_p", "teacher.logits_top_p"), ("samples", "teacher.logits_samples"),
                          ("sampling_seed", "train.seed"), ("sampling_temperature", "distill.temperature")):
        if cache.get(field) != run.get(field):
            held = "none" if cache.get(field) is None else f"{cache[field]:g}"
            wanted = "none" if run.get(field) is None else f"{run[field]:g}"
            return (f"{there} was made with {option} {held} ({field}); this run has {wanted}: rebuild it with "
                    "ted-ds cache-teacher or match the run to it")
    return None
