"""Point-to-point on gloo matched as NCCL matches it, to test multi-GPU protocols on CPU ranks.

NCCL ignores tags: between two ranks the k-th send meets the k-th receive posted for that sender,
and a device-bound communicator runs each rank's operations one at a time, in posting order.
Inside ``matched_as_nccl()`` a rank's ``isend``/``irecv`` (and ``batch_isend_irecv``, which calls
them on gloo) post every message on one tag, run one at a time in posting order on a thread of
their own, and a send completes only once the receiver has the message (it answers on a tag of its
own).  A protocol that leans on tags then receives into the wrong buffer (a size mismatch or
wrong values); one that waits in an order its peers do not share times out at the caller's wait."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import queue
import threading

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

MESSAGE, ANSWER = 0, 1  # the only two tags: every message, and the receiver's "got it"


class SerialQueue:
    """Runs one rank's point-to-point operations one at a time, in posting order."""

    def __init__(self):
        self.jobs = queue.SimpleQueue()
        self.ran = 0  # operations run so far (a harness that sees none did not go through here)
        threading.Thread(target=self._loop, daemon=True, name="p2p-in-posting-order").start()

    def _loop(self):
        while True:
            job, future = self.jobs.get()
            try:
                job()
                self.ran += 1
                future.set_result(True)
            except Exception as e:  # noqa: BLE001 — handed to whoever waits on the operation
                future.set_exception(e)

    def post(self, job) -> SerialWork:
        future = concurrent.futures.Future()
        self.jobs.put((job, future))
        return SerialWork(future)


class SerialWork:
    """The handle ``isend``/``irecv`` return: waits, with the caller's timeout, until the operation ran."""

    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def wait(self, timeout=None) -> bool:
        seconds = timeout.total_seconds() if timeout is not None else None
        try:
            return self.future.result(seconds)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"timed out after {seconds} s (point-to-point run in posting order, as "
                               "NCCL runs it)") from None

    def is_completed(self) -> bool:
        return self.future.done()


@contextlib.contextmanager
def matched_as_nccl():
    """Within: this process's point-to-point follows NCCL's rules (module docstring); yields the
    ``SerialQueue`` that runs it."""
    real_isend, real_irecv = c10d.isend, c10d.irecv
    serial = SerialQueue()

    def in_order(real, answer):
        """``real`` on the one message tag, then ``answer`` on the answer tag to the same peer, run
        by the queue as one operation: a send ends once heard back, a receive answers its sender.
        Takes every way torch names the peer: ``isend(t, dst)`` / ``irecv(t, src)`` (blocking
        ``send``/``recv`` call them so), positionally, or by group rank (``batch_isend_irecv``)."""
        def op(tensor, peer=None, group=None, tag=0, group_dst=None, group_src=None, dst=None, src=None):
            peer = next((p for p in (peer, dst, src) if p is not None), None)
            if peer is None and (group_dst, group_src) != (None, None):
                peer = dist.get_global_rank(group, group_dst if group_dst is not None else group_src)
            if peer is None:
                raise RuntimeError("a receive from any source: NCCL has none")

            def job():
                real(tensor, peer, group, MESSAGE).wait()
                answer(torch.zeros(1), peer, group, ANSWER).wait()
            return serial.post(job)
        return op

    # P2POp checks its op against c10d's own names, and batch_isend_irecv calls the op it holds
    isend, irecv = in_order(real_isend, real_irecv), in_order(real_irecv, real_isend)
    for module in (c10d, dist):
        module.isend, module.irecv = isend, irecv
    try:
        yield serial
    finally:
        for module in (c10d, dist):
            module.isend, module.irecv = real_isend, real_irecv


def tags_ignored(timeout: datetime.timedelta = datetime.timedelta(seconds=60)) -> bool:
    """On every rank, after ranks 0 and 1 swapped two tagged messages through ``batch_isend_irecv``
    (rank 0 sends tag 7 then tag 8; rank 1 receives tag 8 first): whether rank 1's first receive got
    the first message, as under NCCL (plain gloo matches by tag).  Each wait has ``timeout``: a
    harness that stops matching fails instead of hanging."""
    rank, got, ops = dist.get_rank(), [torch.zeros(1), torch.zeros(1)], []
    if rank == 0:
        ops = [dist.P2POp(dist.isend, torch.full((1,), i + 1.0), 1, tag=7 + i) for i in range(2)]
    elif rank == 1:
        ops = [dist.P2POp(dist.irecv, got[i], 0, tag=8 - i) for i in range(2)]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        if not work.wait(timeout):
            raise RuntimeError(f"timed out after {timeout}")
    ok = torch.tensor([float(rank != 1 or [g.item() for g in got] == [1.0, 2.0])])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
