"""Training samples from packed shards: fixed windows, a seeded shuffle and a resumable sampler.

The split's shards form one token stream.  Sample ``i`` is tokens ``[i·L, i·L + L + 1)`` with
``L = seq_len``: inputs are the first ``L``, targets the last ``L`` (windows overlap by one token,
so no token is dropped as a target).  The order of samples in epoch ``e`` is a permutation seeded
by ``(seed, e)``.  The sampler's whole state is one number, the samples consumed so far, and the
``k``-th global batch is positions ``[k·G, (k+1)·G)`` of that endless stream whatever the number
of ranks — so a resumed run continues exactly, also on another rank count.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data_prep.errors import UserError
from data_prep.indexed import IndexedShard
from data_prep.verify import read_manifest


class PackedShardDataset:
    """Random access to ``seq_len + 1``-token windows of one split's concatenated shards."""

    def __init__(self, data_dir: str, split: str, seq_len: int):
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
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return self.tokens(i * self.seq_len, (i + 1) * self.seq_len + 1)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation seeded by (seed, epoch) alone."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_samples)


class ConsumedSamplesSampler:
    """Deals global batches to data-parallel ranks from a consumed-samples counter.

    Global batch ``k`` covers stream positions ``[consumed, consumed + global_batch)``; rank ``r``
    of ``R`` takes the ``r``-th contiguous slice of ``global_batch / R`` positions and cuts it into
    micro-batches.  Slices of different ranks are disjoint; together they cover the batch.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 seed: int, consumed: int = 0):
        if global_batch % (micro_batch * dp_size):
            raise UserError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} × "
                            f"{dp_size} data-parallel ranks")
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed = consumed
        self._order_epoch, self._order = -1, None

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def _sample_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, epoch_order(self.num_samples, self.seed, epoch)
        return int(self._order[offset])

    def rank_positions(self) -> range:
        per_rank = self.global_batch // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        return range(start, start + per_rank)

    def next_batch(self) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for the next global batch."""
        idx = [self._sample_at(p) for p in self.rank_positions()]
        self.consumed += self.global_batch
        mb = self.micro_batch
        return [idx[i: i + mb] for i in range(0, len(idx), mb)]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["global_batch"] != self.global_batch or state["seed"] != self.seed:
            raise UserError(f"data state was saved with global batch {state['global_batch']} and seed "
                            f"{state['seed']}; this run has {self.global_batch} and {self.seed}")
        self.consumed = int(state["consumed_samples"])


def collate(dataset: PackedShardDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (B, seq_len) int64."""
    window = torch.from_numpy(np.stack([dataset[i] for i in indices]))  # (B, L + 1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
