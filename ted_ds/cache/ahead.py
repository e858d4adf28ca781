"""The teacher cache's rows read ahead of the training step, on a thread of the data path.

A run with ``teacher.cache`` reads, per micro-batch, its windows' top-k rows (zstd, delta codes, packed
ids: ``CacheRows.read``). ``RowsAhead`` reads the next global batch's rows on one background thread while
the current step trains, so the loss finds them decoded in its ``MicroBatch`` (``teacher_rows``) instead of
decoding them itself on the training thread. The rows are the same tensors either way: only when they are
read changes.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from ted_ds.cache.format import CacheRows


class RowsAhead:
    """``CacheRows.read`` of whole global batches, one batch ahead. Every read runs on the one worker thread
    (``CacheRows`` keeps its open blocks in a dict, not shared between threads)."""

    def __init__(self, rows: CacheRows):
        self.rows = rows
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-rows")
        self.ahead: tuple[list[list[int]], Future] | None = None  # (the micro-batches' samples, their rows)

    def _read(self, micro: list[list[int]]) -> list[tuple]:
        return [self.rows.read(samples) for samples in micro]

    def take(self, micro: list[list[int]], following: list[list[int]]) -> list[tuple]:
        """The rows of ``micro`` (a global batch's micro-batches of sample indices; read ahead when the last
        call named them as ``following``, else read now), then ``following``'s read started."""
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead[0] != micro:  # the first batch, or the sampler moved (a resume)
            ahead = micro, self.pool.submit(self._read, micro)
        rows = ahead[1].result()  # a damaged block raises its line here, on the training thread
        self.ahead = following, self.pool.submit(self._read, following)
        return rows
