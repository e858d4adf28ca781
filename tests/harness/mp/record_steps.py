"""``python -m ted_ds ...`` recording what each rank's trainer decided at every optimizer step.

    deepspeed --num_gpus 2 tests/harness/mp/record_steps.py --record DIR distill --config run.yaml

Rank r appends one JSON line per step to ``DIR/steps-rank<r>.jsonl``: the step, whether this rank's own
loss was finite, whether the trainer skipped the step, and whether DeepSpeed applied it.
"""

import json
import math
import os
import sys

import ted_ds.trainer as trainer
from ted_ds.cli import main

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
at = argv.index("--record")
path = os.path.join(argv[at + 1], f"steps-rank{os.environ.get('RANK', '0')}.jsonl")
del argv[at:at + 2]
train_step = trainer.train_step


def recorded(recipe, batches, step=0, nan_steps=None):
    sums, skipped = train_step(recipe, batches, step, nan_steps)
    row = {"step": step, "own_loss_finite": math.isfinite(float(sums["loss"])), "skipped": skipped,
           "applied": recipe.engine.was_step_applied()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return sums, skipped


trainer.train_step = recorded
sys.exit(main(argv))
