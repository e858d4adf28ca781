"""What depends on the machine a process runs on, made explicit: the CPU (and the Python, torch and
CUDA) that DeepSpeed's JIT-compiled ops are built for.

DeepSpeed compiles its CPU ops (the shared-memory communicator, CPU Adam) with ``-march=native``,
and torch reuses a cached build whenever the sources and flags match — the flag text, not the CPU it
stood for. A cache built on one CPU and read on another (a shared home directory, a CI cache, a
cluster of mixed nodes) then dies with an illegal instruction; one built against another torch or
Python (two environments sharing the cache path) fails to load or crashes, and two environments of the
same versions rebuild it in turn at each start (its include paths differ). Keying the cache directory
by the CPU, those versions and DeepSpeed's location makes each build its own copy instead.

Every op load also asks py-cpuinfo for the CPU's architecture and SIMD width (twice per op, in every
process), and py-cpuinfo answers from a fresh Python interpreter each time, ~1 s apiece: 2–5 s of every
rank's start.  The answer is the CPU's, so it is kept beside the ops in the CPU-keyed directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys

CPU_KEY_PREFIX = "cpu-"


def cpu_key(cpuinfo: str, build: str = "") -> str:
    """A short name for the CPU ``/proc/cpuinfo`` describes: its vendor, model and instruction-set flags
    (what ``-march=native`` compiles for), and the ``build`` (``this_build``) that compiles the ops, so
    two processes share it only if their builds can be shared."""
    first = cpuinfo.split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    wanted = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU part", "Features")
    described = "\n".join(f"{k}={' '.join(sorted(fields[k].split())) if k in ('flags', 'Features') else fields[k]}"
                          for k in wanted if k in fields)
    described = (described or f"{platform.machine()} {platform.processor()}") + f"\nbuild={build}"
    return CPU_KEY_PREFIX + hashlib.sha256(described.encode()).hexdigest()[:12]


def this_build() -> str:
    """What an op's build is bound to besides the CPU: the Python, torch and CUDA versions, and where
    DeepSpeed's op sources are (torch rebuilds an op whose include paths changed, so two environments of
    the same versions sharing one cache would rebuild it in turn at every start)."""
    import importlib.util

    import torch

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = importlib.util.find_spec("deepspeed")
    sources = os.path.dirname(spec.origin) if spec and spec.origin else None
    return f"python {python} torch {torch.__version__} cuda {torch.version.cuda} deepspeed {sources}"


def this_cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_key(f.read(), this_build())
    except OSError:  # not Linux
        return cpu_key("", this_build())


def keyed_extensions_dir(current: str | None, key: str) -> str:
    """``TORCH_EXTENSIONS_DIR`` for the CPU ``key``: a subdirectory of the configured (or torch's
    default) directory; a directory already keyed, for this CPU or another (inherited from a process
    on another node), gets this CPU's key in place of its own."""
    if not current:
        from torch.utils.cpp_extension import get_default_build_root

        current = get_default_build_root()
    current = current.rstrip("/") or "/"
    if os.path.basename(current).startswith(CPU_KEY_PREFIX):
        current = os.path.dirname(current)
    return os.path.join(current, key)


def use_cpu_keyed_extensions() -> None:
    """Point this process (and what it starts) at the op cache of this CPU, and py-cpuinfo's answers at the
    copy kept there; before any op is built."""
    os.environ["TORCH_EXTENSIONS_DIR"] = keyed_extensions_dir(os.environ.get("TORCH_EXTENSIONS_DIR"), this_cpu_key())
    remember_cpu_info(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "cpuinfo.json"))


def remember_cpu_info(path: str) -> None:
    """``cpuinfo.get_cpu_info`` (what DeepSpeed's op builders call) reads ``path``, asking py-cpuinfo and
    writing it there the first time."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu
        return
    ask = getattr(cpuinfo.get_cpu_info, "asks", cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
        info = ask()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(info, f)
        # a temporary file per process: a node's ranks may all write it at once, where fileio.write_text's one
        # shared .tmp would be removed under a writer; os.replace keeps it whole or absent for a reader
        os.replace(f"{path}.{os.getpid()}", path)
        return info

    get_cpu_info.asks = ask
    cpuinfo.get_cpu_info = get_cpu_info
