"""One-process training commands forked from a warm interpreter: a study's hundreds of short CPU runs each
spent ~8 s importing torch, transformers and DeepSpeed before a second of training.

A ``multiprocessing`` fork server imports them once (``PRELOAD``); every command is a fresh fork of it
that runs ``ted_ds.cli.main`` as ``python -m ted_ds`` would, with its own environment, thread count and
output, and exits with the command's status.  The server never runs a tensor operation, so no OpenMP
pool exists when it forks (libgomp's pool does not survive a fork).
"""

from __future__ import annotations

import multiprocessing
import os
import pkgutil
import sys
import tempfile

PRELOAD = ["torch", "deepspeed", "deepspeed.runtime.engine", "transformers", "transformers.masking_utils",
           "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2", "ted_ds"]
_server = None


def _server_context():
    """The fork server, started on first use with DeepSpeed told this is a CPU (as every study run is)."""
    global _server
    if _server is None:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when the server imports DeepSpeed
        _server = multiprocessing.get_context("forkserver")
        import ted_ds

        ted_ds_modules = [m.name for m in pkgutil.walk_packages(ted_ds.__path__, "ted_ds.")
                          if not m.name.endswith("__main__")]
        _server.set_forkserver_preload(PRELOAD + ted_ds_modules)
    return _server


def _command(argv: list[str], env: dict[str, str], log: str) -> None:
    """The forked child: ``python -m ted_ds *argv`` with ``env``, stdout and stderr into ``log``."""
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    from ted_ds.cli import main

    rc = main(argv)  # a command that formed a process group leaves by os._exit with its status itself
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)


def ted_ds(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """``python -m ted_ds *argv`` as a fork of the warm server; its output, or exit the bench with the
    output's tail if it failed (as ``bench.common.run``)."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        child = _server_context().Process(target=_command, args=(argv, env, log.name))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
        output = open(log.name, encoding="utf-8", errors="replace").read()
    if child.exitcode != 0:
        sys.exit(f"benchmark step failed (exit {child.exitcode}): ted-ds {' '.join(argv)}\n{output[-4000:]}")
    return output
