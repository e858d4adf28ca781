"""``ted-ds``: task-aware layer-wise distillation (TED) of causal LMs on DeepSpeed ZeRO-3.

Stages and baselines (every training command takes ``--config RUN.yaml`` plus ``key=value``
overrides, e.g. ``train.steps=200 distill.beta=2``)::

    ted-ds learn-filters --config run.yaml --model teacher   # TED stage 1, teacher side
    ted-ds learn-filters --config run.yaml --model student   # TED stage 1, student side
    ted-ds distill --config run.yaml                         # stage 2 (or lwd / kd / lm by distill.method)
    ted-ds cache-teacher --config run.yaml --out cache/      # the teacher's top-k logits, once, for teacher.cache

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
import sys
from typing import TYPE_CHECKING

from data_prep.errors import UserError, run_cli

if TYPE_CHECKING:
    from ted_ds.trainer import FitResult

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on a signal after saving; run the same command again to resume


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run configuration (YAML); see ted_ds/configs/")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python code shipped in the teacher/student directories to run (off by default)")


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
    p = sub.add_parser("cache-teacher", help="run the teacher once over the run's windows and keep its top-k logits",
                       description="Run the teacher (teacher.placement, any number of ranks) over every train and "
                                   "valid window of the run's data sources and write its top-k logits "
                                   "(teacher.logits_topk, rounded to teacher.logits_dtype: fp16 or bf16) and their "
                                   "ids to --out, compressed, for `teacher.cache: DIR` in later runs: KD then never "
                                   "loads the teacher. The same bytes for any rank count; re-running the command "
                                   "resumes an interrupted build. Format: ted_ds/cache/format.py and the README.")
    _training_args(p)
    p.add_argument("--out", required=True, help="the cache directory to write (or to finish)")
    p.add_argument("--batch-size", type=int, help="windows per teacher call (default: train.micro_batch_size)")
    p.add_argument("--block-windows", type=int, default=256,
                   help="windows per block file: the unit of work, of resume and of the checksums (default 256)")
    _offline_commands(sub)
    return parser


def _offline_commands(sub) -> None:
    """The commands that start no training: export, launch, eval."""
    p = sub.add_parser("export", help="checkpoint → Hugging Face directory (and/or filter bank)",
                       description="Consolidate a checkpoint's ZeRO-3 shards (DeepSpeed's zero_to_fp32), keep only "
                                   "the student, and write a standard HF directory (safetensors, config, generation "
                                   "config, tokenizer). The directory is then reloaded with transformers and its "
                                   "logits compared with the checkpoint's. No GPU or process group needed.")
    p.add_argument("checkpoint", help="a run's out_dir, its checkpoints/<recipe> directory, or one tag directory")
    p.add_argument("--out", help="HF directory to write")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--filters", metavar="DIR", help="also write the student's filter bank here")
    p.add_argument("--tokenizer", help="tokenizer to copy: a directory or a cached hub id (default: the dataset's "
                                       "copy recorded in the checkpoint)")

    p = sub.add_parser("launch", help="print the launch commands for a cluster shape (starts nothing)",
                       description="Check that the config fits nodes × GPUs ranks and print the exact command of "
                                   "each launcher: deepspeed (hostfile + pdsh), srun (sbatch slurm/ted_ds.sbatch), "
                                   "torchrun (one line per node), mpirun.")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--hosts", help="comma-separated host names (default node1..nodeN)")
    p.add_argument("--launcher", choices=("all", "deepspeed", "srun", "torchrun", "mpirun"), default="all")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("training", nargs=argparse.REMAINDER,
                   help="the ted-ds command to launch, e.g. distill --config run.yaml train.steps=1000")

    p = sub.add_parser("eval", help="perplexity and bits per byte of an HF model on a ted-prep split")
    p.add_argument("model_dir", metavar="MODEL", help="HF directory, or a hub id (org/name) in the local HF cache")
    p.add_argument("--revision", help="with a hub id: branch, tag or commit of the cached snapshot (default: main)")
    p.add_argument("--data", required=True, help="ted-prep build directory")
    p.add_argument("--split", default="valid", choices=("train", "valid"))
    p.add_argument("--seq-len", type=int, help="window length (default: the length a ted-ds model was trained at, else "
                   "the model's positions, at most 1024)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-samples", type=int, help="score at most this many windows")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--trust-remote-code", action="store_true", help="allow Python code in MODEL_DIR to run")


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


def _run_config(args: argparse.Namespace):
    """The run config of a command that takes one: ``--config``, its overrides, ``--trust-remote-code``."""
    from ted_ds.config import load_run_config

    trust = ["teacher.trust_remote_code=true", "student.trust_remote_code=true"] if args.trust_remote_code else []
    return load_run_config(args.config, [*args.overrides, *trust])


def finished_line(recipe: str, result: FitResult, out_dir: str) -> str:
    """What a finished launch says: what it trained, or that the run had finished before it started."""
    if result.finished_before:
        return (f"{recipe} in {out_dir} had already finished at step {result.step}: nothing to train (outputs "
                f"in {result.output}); to train on from it, start a new run with "
                f"train.init_from={os.path.join(out_dir, 'checkpoints', recipe)} and another train.out_dir")
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k in ("loss/total", "eval/ppl"))
    return f"{recipe} finished at step {result.step} ({summary}); wrote {result.output}"


def run_training(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from ted_ds import distributed
    from ted_ds.plan import Job
    from ted_ds.run import run_recipe

    cfg = _run_config(args)
    with distributed.collective_errors(cfg.train.timeout_minutes):
        recipe, _, result = run_recipe(cfg, Job.learning_filters_of(getattr(args, "model", None)))
        if distributed.rank() == 0 and not result.stopped:
            print(f"ted-ds: {finished_line(recipe.name, result, cfg.train.out_dir)}", file=sys.stderr)
        distributed.shutdown()
    return EXIT_RESUMABLE if result.stopped else 0


def run_cache(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from ted_ds import distributed
    from ted_ds.cache.build import build_cache

    cfg = _run_config(args)
    with distributed.collective_errors(cfg.train.timeout_minutes):
        line = build_cache(cfg, args.out, args.batch_size, args.block_windows)
        if distributed.rank() == 0:
            print(f"ted-ds: {line}", file=sys.stderr)
        distributed.shutdown()
    return 0


def run_export(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from ted_ds.export import export_checkpoint
    from ted_ds.hub import resolve

    if args.out is None and args.filters is None:
        raise UserError("nothing to do: give --out HF_DIR and/or --filters DIR")
    tokenizer = resolve(args.tokenizer, what="--tokenizer") if args.tokenizer else None
    for line in export_checkpoint(args.checkpoint, args.out, args.tag, args.dtype, args.filters, tokenizer):
        print(f"ted-ds: {line}", file=sys.stderr)
    return 0


def run_launch(args: argparse.Namespace) -> int:
    from ted_ds.config import load_run_config
    from ted_ds.launch import LAUNCHERS, check_world, launch_commands

    command = [a for a in args.training if a != "--"]
    if not command or command[0] not in ("distill", "learn-filters") or "--config" not in command:
        raise UserError("give the command to launch after the options, e.g. "
                        "`ted-ds launch --nodes 2 --gpus-per-node 8 distill --config run.yaml`")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be ≥ 1")
    hosts = args.hosts.split(",") if args.hosts else [f"node{i + 1}" for i in range(args.nodes)]
    if len(hosts) != args.nodes:
        raise UserError(f"--hosts names {len(hosts)} hosts, --nodes says {args.nodes}")
    rest = command[1:]
    config = rest[rest.index("--config") + 1]
    cfg = load_run_config(config, [a for a in rest if "=" in a and not a.startswith("-")])
    print(f"# {check_world(cfg, args.nodes * args.gpus_per_node)}")
    for launcher in (LAUNCHERS if args.launcher == "all" else (args.launcher,)):
        print(f"# --- {launcher}")
        for line in launch_commands(launcher, args.nodes, args.gpus_per_node, hosts, command, args.port,
                                    cfg.train.out_dir):
            print(line)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from ted_ds.architectures import quiet_transformers
    from ted_ds.evaluate import evaluate_hf
    from ted_ds.hub import resolve

    quiet_transformers()
    model_dir = resolve(args.model_dir, args.revision)
    if not os.path.isdir(model_dir):
        raise UserError(f"not a model directory: {model_dir}")
    r = evaluate_hf(model_dir, args.data, args.split, args.seq_len, args.batch_size, args.max_samples,
                    args.device, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{args.model_dir} on {args.data} [{r['split']}]: {r['samples']} windows × {r['seq_len']} tokens, "
              f"loss {r['loss']:.4f}, perplexity {r['ppl']:.3f}, bits/byte {r['bits_per_byte']:.4f}")
    return 0


def parse_args(argv: list[str] | None):
    """Like parse_args, but KEY=VALUE overrides may also come after options (e.g. after --model)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("distill", "learn-filters", "cache-teacher"):
        command = run_cache if args.command == "cache-teacher" else run_training
        rc = run_cli("ted-ds", lambda: command(args), "interrupted")
        if "ted_ds.distributed" not in sys.modules or not sys.modules["ted_ds.distributed"].started():
            return rc  # failed before any process group: a normal return
        sys.modules["ted_ds.distributed"].leave(rc)
    commands = {"export": run_export, "eval": run_eval, "launch": run_launch}
    return run_cli("ted-ds", lambda: commands[args.command](args), "interrupted")


if __name__ == "__main__":
    sys.exit(main())
