"""``ted-ds``: task-aware layer-wise distillation (TED) of causal LMs on DeepSpeed ZeRO-3.

Stages and baselines (every training command takes ``--config RUN.yaml`` plus ``key=value``
overrides, e.g. ``train.steps=200 distill.beta=2``)::

    ted-ds learn-filters --config run.yaml --model teacher   # TED stage 1, teacher side
    ted-ds learn-filters --config run.yaml --model student   # TED stage 1, student side
    ted-ds distill --config run.yaml                         # stage 2 (or lwd / kd / lm by distill.method)

Launch on several processes with any launcher::

    deepspeed --num_gpus 2 --module ted_ds distill --config run.yaml
    torchrun --nproc_per_node 2 -m ted_ds distill --config run.yaml
    mpirun -np 2 python -m ted_ds distill --config run.yaml
    srun --ntasks 8 python -m ted_ds distill --config run.yaml        (see slurm/)

Re-running the same command resumes from the last checkpoint in ``train.out_dir``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

from data_prep.errors import UserError


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run configuration (YAML); see ted_ds/configs/")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ted-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("distill", help="train the student: TED stage 2, or the lwd / kd / lm baselines",
                       description="Train the student (ZeRO-3) next to the frozen teacher. distill.method picks "
                                   "ted, lwd, kd or lm (no teacher: plain continual pre-training).")
    _training_args(p)
    p = sub.add_parser("learn-filters", help="TED stage 1: learn the task-aware filters of a frozen model",
                       description="Freeze the teacher or the student and train one filter per tap so that the "
                                   "teacher's head predicts the next token from every filtered state.")
    _training_args(p)
    p.add_argument("--model", choices=("teacher", "student"), required=True)
    return parser


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _quiet_libraries() -> None:
    """Keep DeepSpeed's per-step INFO lines and torch's deprecation noise out of the user's log."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # skips the auto-detection warning
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def run_training(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from ted_ds import distributed as D
    from ted_ds.checkpoint import Checkpointer
    from ted_ds.config import load_config, save_config
    from ted_ds.engine import resolve_ds_config
    from ted_ds.export import save_trained_outputs
    from ted_ds.stages import build_distill, build_filter_learning, plan
    from ted_ds.trainer import fit

    cfg = load_config(args.config, args.overrides)
    which = getattr(args, "model", None)
    p = plan(cfg, filters_for=which)
    D.prepare_env()
    ds = resolve_ds_config(cfg, D.expected_world_size())  # all checks done before the process group
    D.init(cfg.train.timeout_minutes)
    _seed_everything(cfg.train.seed)
    stage = build_filter_learning(p, ds, which) if which else build_distill(p, ds)
    if D.rank() == 0:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.train.out_dir, "config.yaml"))
    ckpt_dir = os.path.join(cfg.train.out_dir, "checkpoints", stage.name)
    identity = {"stage": stage.name, "vocab_sha256": p.manifest["tokenizer"]["vocab_sha256"],
                "student_layers": p.student_config.num_hidden_layers,
                "student_hidden": p.student_config.hidden_size, "taps": [list(x) for x in p.pairs],
                "seq_len": cfg.data.seq_len, "global_batch_size": cfg.train.global_batch_size}
    result = fit(stage, p, Checkpointer(ckpt_dir, cfg.train.keep_last, identity))
    if not result["stopped"]:
        target = save_trained_outputs(stage, p, cfg.train.out_dir)
        if D.rank() == 0:
            summary = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k in ("loss/total", "eval/ppl"))
            print(f"ted-ds: {stage.name} finished at step {result['step']} ({summary}); wrote {target}",
                  file=sys.stderr)
    D.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("distill", "learn-filters"):
            return run_training(args)
        return 2
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        prefix = "ted-ds: error: " if rank == "0" else f"ted-ds: rank {rank}: error: "
        print(prefix + str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ted-ds: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
