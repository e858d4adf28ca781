"""The Megatron "MMIDIDX" indexed format: a ``.bin`` token stream plus an ``.idx`` index.

``.idx`` layout (little endian)::

    b"MMIDIDX\\x00\\x00"  | u64 version=1 | u8 dtype code | u64 n_seq | u64 n_doc
    i32 sizes[n_seq] | i64 byte pointers[n_seq] | i64 doc_idx[n_doc]

One sequence per document here, so ``doc_idx = 0..n_seq``.  The dtype code tables of the two
readers in the wild disagree above code 5: Megatron-LM / GPT-NeoX / Megatron-DeepSpeed use 8 for
uint16 and have no uint32, DeepSpeed's ``data_sampling.MMapIndexedDataset`` uses 6 for uint16
and 7 for uint32.  ``codes="megatron"`` (default) writes the former, ``codes="deepspeed"`` the
latter; for vocabularies above 65,536 the megatron flavour stores int32 (code 4, readable by
both), the deepspeed flavour uint32.
"""

from __future__ import annotations

import array
import contextlib
import os
import struct

import numpy as np

from data_prep.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8

CODE_TABLES: dict[str, dict[int, type]] = {
    "megatron": {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                 8: np.uint16},
    "deepspeed": {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint16, 7: np.uint32,
                  8: np.uint64},
}


def token_dtype(vocab_size: int, codes: str = "megatron") -> np.dtype:
    """Smallest integer type that holds every token id of the vocabulary in this code table."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32 if codes == "deepspeed" else np.int32)


def dtype_code(dtype: np.dtype, codes: str) -> int:
    for code, np_type in CODE_TABLES[codes].items():
        if np.dtype(np_type) == np.dtype(dtype):
            return code
    raise ValueError(f"{np.dtype(dtype)} has no code in the {codes} table")


class ShardError(UserError):
    """A shard on disk is truncated, corrupted or inconsistent with its index."""


class ShardWriter:
    """Streams documents into ``<prefix>.bin.tmp``; ``finish()`` writes the index and renames both.

    A partially written shard therefore never appears under its final name.
    """

    def __init__(self, prefix: str, dtype: np.dtype, codes: str):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.codes = codes
        self.sizes = array.array("q")  # 8 bytes per document, not a Python int object each
        self._bin = open(prefix + ".bin.tmp", "wb")

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one concatenated token array and their lengths."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.sizes.frombytes(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self.prefix + ".idx.tmp", np.frombuffer(self.sizes, dtype=np.int64), self.dtype, self.codes)
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails too
            self._bin.close()
        for suffix in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


def write_index(path: str, sizes: np.ndarray, dtype: np.dtype, codes: str) -> None:
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1] * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", dtype_code(dtype, codes)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(sizes) + 1))
        f.write(sizes.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(sizes) + 1, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


class IndexedShard:
    """Read-only, memory-mapped view of one shard, validated on open.

    Checks the header, that the index arrays fit the ``.idx`` file exactly, that pointers are
    the running sum of sizes and that the ``.bin`` file holds exactly the tokens they describe.
    Any mismatch is a ``ShardError`` naming the file: a truncated shard never yields garbage.
    """

    def __init__(self, prefix: str, codes: str = "megatron"):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise ShardError(f"shard file missing: {p}")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
            raise ShardError(f"{idx_path}: not an MMIDIDX index (bad or truncated header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != 1:
            raise ShardError(f"{idx_path}: unsupported index version {version}")
        if code not in CODE_TABLES[codes]:
            raise ShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(CODE_TABLES[codes][code])
        expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if idx_size != expected:
            raise ShardError(f"{idx_path}: index is {idx_size} bytes, header implies {expected} (truncated or corrupt)")
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sizes = np.frombuffer(index, dtype=np.int32, count=n_seq, offset=off)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        self.doc_idx = np.frombuffer(index, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        if n_seq and (self.sizes.min() < 0):
            raise ShardError(f"{idx_path}: negative document size")
        sizes64 = self.sizes.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes64[:-1])]) * self.dtype.itemsize if n_seq else sizes64
        if not np.array_equal(starts, self.pointers):
            raise ShardError(f"{idx_path}: pointers disagree with document sizes (corrupt index)")
        self.num_tokens = int(sizes64.sum())
        bin_size = os.path.getsize(bin_path)
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise ShardError(
                f"{bin_path}: {bin_size} bytes, index describes {self.num_tokens * self.dtype.itemsize} "
                "(truncated or wrong .bin)"
            )
        self.tokens = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if self.num_tokens else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def document(self, i: int) -> np.ndarray:
        start = self.pointers[i] // self.dtype.itemsize
        return self.tokens[start: start + self.sizes[i]]
