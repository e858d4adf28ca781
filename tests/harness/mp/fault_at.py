"""``python -m ted_ds ...`` with one fault injected at a named point of the run.

    deepspeed --num_gpus 2 tests/harness/mp/fault_at.py --fault POINT:N:RANK:SIGNAL distill --config run.yaml

At the N-th time the run reaches POINT, rank RANK ("all": every rank) sends itself SIGNAL
(KILL, TERM).  Points:

    save-start    a checkpoint save begins: before any file of the tag is written
    save-shards   DeepSpeed wrote this rank's shards; the RNG file and COMPLETE are not written yet
    save-latest   the tag is complete (COMPLETE written); ``latest`` not yet moved (rank 0 only)
    eval          an evaluation begins
    cache-block   ``ted-ds cache-teacher`` renamed a finished block file into place
"""

import os
import signal
import sys

import ted_ds.cache.build as cache_build
import ted_ds.checkpoint as checkpoint
import ted_ds.trainer as trainer
from ted_ds.cli import main

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
at = argv.index("--fault")
point, nth, who, signame = argv[at + 1].split(":")
del argv[at:at + 2]
rank = int(os.environ.get("RANK", "0"))
seen = {"n": 0}


def reached(where: str) -> None:
    if where != point:
        return
    seen["n"] += 1
    if seen["n"] == int(nth) and who in ("all", str(rank)):
        os.kill(os.getpid(), getattr(signal, f"SIG{signame}"))


def before(where: str, fn, when=lambda *a, **k: True):
    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            reached(where)
        return fn(*args, **kwargs)
    return wrapped


def after(where: str, fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        reached(where)
        return out
    return wrapped


checkpoint.check_finite = after("save-start", checkpoint.check_finite)  # save's first act; nothing written yet
checkpoint.rng_state = before("save-shards", checkpoint.rng_state)
checkpoint.write_text = before("save-latest", checkpoint.write_text, lambda path, _: path.endswith("latest"))
trainer.evaluate = before("eval", trainer.evaluate)
cache_build.write_block = after("cache-block", cache_build.write_block)
sys.exit(main(argv))
