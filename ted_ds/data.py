"""Training samples from packed shards: fixed windows, a seeded shuffle and a resumable sampler.

The split's shards form one token stream.  Sample ``i`` is tokens ``[i·L, i·L + L + 1)`` with
``L = seq_len``: inputs are the first ``L``, targets the last ``L`` (windows overlap by one token,
so no token is dropped as a target).  The order of samples in epoch ``e`` is a permutation seeded
by ``(seed, e)``.  The sampler's whole state is one number, the samples consumed so far, and the
``k``-th global batch is positions ``[k·G, (k+1)·G)`` of that endless stream whatever the number
of ranks — so a resumed run continues exactly, also on another rank count.

Several sources (``data.sources``) are blended by weight: blend position ``p`` maps to (source,
``n``-th sample of that source) by a closed-form function of ``p`` (``Blend``), and each source
walks its own seeded epochs, so the same one-number state resumes a mixture exactly too.
"""

from __future__ import annotations

import bisect
import itertools
import os
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from data_prep.errors import UserError
from data_prep.format import read_manifest
from data_prep.indexed import IndexedShard
from ted_ds import config


class DamagedWindow(UserError):
    """A window holds a token id the vocabulary does not have: its shard's bytes are damaged."""


class PackedShardDataset:
    """Random access to ``seq_len + 1``-token windows of one split's concatenated shards."""

    def __init__(self, data_dir: str, split: str, seq_len: int):
        self.data_dir, self.split = data_dir, split
        self.manifest = read_manifest(data_dir)
        if split not in self.manifest["shards"]:
            raise UserError(f"{data_dir}: no split {split!r}")
        records = self.manifest["shards"][split]
        self.shards = [IndexedShard(os.path.join(data_dir, r["name"]), self.manifest["index_codes"]) for r in records]
        for shard, rec in zip(self.shards, records):
            if shard.num_tokens != rec["tokens"]:
                raise UserError(f"{shard.prefix}: holds {shard.num_tokens} tokens, manifest says {rec['tokens']}")
        sizes = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # token offset of each shard
        self.num_tokens = int(self.starts[-1])
        self.seq_len = seq_len
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples == 0:
            raise UserError(f"{data_dir}: the {split} split has {self.num_tokens} tokens, too few for one sample "
                            f"of seq_len {seq_len} + 1")

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` of the concatenated stream, as int64."""
        out = np.empty(end - start, dtype=np.int64)
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < end:
            shard = self.shards[k]
            lo = pos - self.starts[k]
            hi = min(end, self.starts[k + 1]) - self.starts[k]
            out[pos - start: pos - start + (hi - lo)] = shard.tokens[lo:hi]
            pos += hi - lo
            k += 1
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        """Window ``i``; one with an id ≥ the vocabulary size (damaged bytes) is a ``DamagedWindow``, never
        an index error deep in an embedding."""
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        window = self.tokens(i * self.seq_len, (i + 1) * self.seq_len + 1)
        if window.max() >= self.manifest["vocab_size"]:
            raise DamagedWindow(self._damage(i, window))
        return window

    def _damage(self, i: int, window: np.ndarray) -> str:
        first = int(np.argmax(window >= self.manifest["vocab_size"]))
        at = i * self.seq_len + first
        k = int(np.searchsorted(self.starts, at, side="right")) - 1
        return (f"{self.shards[k].prefix}.bin: token {at - self.starts[k]} (in window {i} of the {self.split} split) "
                f"is id {window[first]}, past the vocabulary of {self.manifest['vocab_size']}: the shard is damaged; "
                f"`ted-prep verify {self.data_dir}` checks every shard")


def epoch_order(num_samples: int, seed: int, epoch: int, source: int = 0) -> np.ndarray:
    """The sample order of one epoch of one source: a permutation seeded by (seed, epoch, source)
    alone.  Source 0 keeps the one-source key (seed, epoch), so a one-source run is unchanged."""
    key = [seed, epoch] if source == 0 else [seed, epoch, source]
    return np.random.Generator(np.random.PCG64(key)).permutation(num_samples)


def source_offsets(sizes) -> tuple[int, ...]:
    """Where each source's samples start when the sources are concatenated, then where the last ends."""
    return tuple(itertools.accumulate(sizes, initial=0))


@dataclass(frozen=True)
class Blend:
    """Sources mixed by weight into one endless stream of (source, sample-of-source) positions.

    Source ``i`` takes a share ``f_i = w_i / (w_i + … + w_last)`` of the positions the sources
    before it leave, Bresenham-style: of the first ``q`` positions it sees it holds ``round(f_i·q)``.
    So every source is within a sample or two of its share over any window, and what each source
    holds at position ``p`` comes in closed form: O(sources) per position, never a scan from 0.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def single(cls, num_samples: int) -> Blend:
        return cls(("data",), (num_samples,), (1.0,))

    @cached_property
    def fractions(self) -> np.ndarray:
        w = np.asarray(self.weights, dtype=np.float64)
        tail = np.cumsum(w[::-1])[::-1]
        return np.divide(w, tail, out=np.zeros_like(w), where=tail > 0)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each source's samples start in the concatenated index space (``BlendedDataset``)."""
        return source_offsets(self.sizes)

    def counts(self, positions) -> np.ndarray:
        """Samples each source holds among the first ``positions`` of the stream: (sources, *shape)."""
        left = np.asarray(positions, dtype=np.int64)
        out = []
        for f in self.fractions[:-1]:
            mine = np.floor(f * left + 0.5).astype(np.int64)
            out.append(mine)
            left = left - mine
        out.append(left)
        return np.stack(out)

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(source, n) of each stream position: the source whose count grows there, and its count before."""
        before = self.counts(positions)
        source = np.argmax(self.counts(np.asarray(positions) + 1) - before, axis=0)
        return source, np.take_along_axis(before, source[None], axis=0)[0]

    def report(self, consumed: int) -> dict[str, dict]:
        """Samples and epochs (fractional) consumed per source after ``consumed`` stream positions."""
        return {name: {"samples": int(n), "epochs": int(n) / size, "weight": w}
                for name, n, size, w in zip(self.names, self.counts(consumed), self.sizes, self.weights)}


class BlendedDataset:
    """The sources' windows in one index space: source ``i``'s sample ``j`` is ``offsets[i] + j``."""

    def __init__(self, parts: list[PackedShardDataset]):
        self.parts = parts
        self.offsets = source_offsets([len(d) for d in parts])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]


LOCATE_BLOCK = 4096


class ConsumedSamplesSampler:
    """Deals global batches to data-parallel ranks from a consumed-samples counter.

    Global batch ``k`` covers stream positions ``[consumed, consumed + global_batch)``; rank ``r``
    of ``R`` takes the ``r``-th contiguous slice of ``global_batch / R`` positions and cuts it into
    micro-batches.  Slices of different ranks are disjoint; together they cover the batch.  With a
    ``Blend`` the indices are into the sources' ``BlendedDataset``.
    """

    def __init__(self, data: int | Blend, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, consumed: int = 0):
        config.accumulation_steps(global_batch, micro_batch, dp_size)  # the batch splits over the ranks
        self.blend = data if isinstance(data, Blend) else Blend.single(data)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = consumed
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its order)
        self._block, self._located = -1, []  # (source, n) of each position of one block of the stream

    @property
    def accumulation_steps(self) -> int:
        return config.accumulation_steps(self.global_batch, self.micro_batch, self.dp_size)

    def _locate(self, position: int) -> tuple[int, int]:
        """``Blend.locate`` of one position, computed a block of positions at a time (numpy per block,
        not per sample)."""
        block, i = divmod(position, LOCATE_BLOCK)
        if block != self._block:
            sources, ns = self.blend.locate(np.arange(block * LOCATE_BLOCK, (block + 1) * LOCATE_BLOCK))
            self._block, self._located = block, list(zip(sources.tolist(), ns.tolist()))
        return self._located[i]

    def _sample_at(self, position: int) -> int:
        source, n = self._locate(position)
        size = self.blend.sizes[source]
        epoch, offset = divmod(n, size)
        if self._orders.get(source, (-1,))[0] != epoch:
            self._orders[source] = epoch, epoch_order(size, self.seed, epoch, source)
        return self.blend.offsets[source] + int(self._orders[source][1][offset])

    def rank_positions(self) -> range:
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        return range(start, start + per_rank)

    def upcoming(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) of the next global batch, the counter left
        where it is (what a read-ahead reads before the batch is dealt)."""
        idx = [self._sample_at(p) for p in self.rank_positions()]
        mb = self.micro_batch
        return [idx[i: i + mb] for i in range(0, len(idx), mb)]

    def next_batch(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for the next global batch."""
        batch = self.upcoming()
        self.consumed += self.global_batch
        return batch

    def state_dict(self) -> dict:
        """The counter (the whole state) plus, for the record, what each source has given so far."""
        return {"consumed_samples": self.consumed, "seed": self.seed, "global_batch": self.global_batch,
                "sources": self.blend.report(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch or state["seed"] != self.seed:
            raise UserError(f"data state was saved with global batch {state['global_batch']} and seed "
                            f"{state['seed']}; this run has {self.global_batch} and {self.seed}")
        saved = {k: v["weight"] for k, v in state.get("sources", {}).items()}
        if saved and saved != dict(zip(self.blend.names, self.blend.weights)):
            raise UserError(f"data state was saved with source weights {saved}; this run has "
                            f"{dict(zip(self.blend.names, self.blend.weights))}")
        self.consumed = int(state["consumed_samples"])


def collate(dataset: PackedShardDataset | BlendedDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (B, seq_len) int64."""
    window = torch.from_numpy(np.stack([dataset[i] for i in indices]))  # (B, L + 1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class MicroBatch(NamedTuple):
    """What a recipe's loss gets: the windows of one micro-batch and the sampler's indices of them, by which
    a teacher cache finds their rows (the same on any rank count, micro-batch size or resume)."""

    input_ids: torch.Tensor  # (B, seq_len)
    labels: torch.Tensor  # (B, seq_len)
    samples: list[int]  # index of each window in the training data (a BlendedDataset index)
    teacher_view: object = None  # across tokenizers: the teacher's tokens and the chunks (crosstok.TeacherView)
    teacher_rows: tuple | None = None  # teacher.cache: (values, ids, draws) of these windows (CacheRows.read)
