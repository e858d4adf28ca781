"""``python -m ted_ds distill`` whose rank 1 is SIGKILLed in the middle of its Nth checkpoint save
(after DeepSpeed wrote its shards, before the checkpoint was marked complete).

    deepspeed --num_gpus 2 tests/mp/crash_during_save.py --crash-at N distill --config run.yaml
"""

import os
import signal
import sys

import ted_ds.checkpoint as checkpoint
from ted_ds.cli import main

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
crash_at = int(argv[argv.index("--crash-at") + 1])
argv = [a for i, a in enumerate(argv) if a != "--crash-at" and (i == 0 or argv[i - 1] != "--crash-at")]
calls = {"n": 0}
original = checkpoint.rng_state


def rng_state_then_die():
    calls["n"] += 1
    if calls["n"] == crash_at and int(os.environ.get("RANK", "0")) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return original()


checkpoint.rng_state = rng_state_then_die
sys.exit(main(argv))
