"""DeepSpeed's JIT-compiled ops are cached per CPU: a build for one CPU is never loaded on another."""

from __future__ import annotations

import importlib.util
import os

from ted_ds.host import cpu_key, keyed_extensions_dir

AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 avx512f avx512_bf16
"""


def test_the_cpu_key_follows_vendor_model_and_instruction_set():
    key = cpu_key(AMD)
    assert key.startswith("cpu-") and key == cpu_key(AMD.replace("avx2 avx512f", "avx512f avx2"))  # flag order
    assert key == cpu_key(AMD.replace("processor\t: 1", "processor\t: 1\ncpu MHz\t\t: 2400.1"))  # not the clock
    intel = AMD.replace("AuthenticAMD", "GenuineIntel").replace("AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C")
    with_fp16 = intel.replace("avx512_bf16", "avx512_bf16 avx512_fp16 amx_fp16")  # what -march=native would use
    assert len({key, cpu_key(intel), cpu_key(with_fp16)}) == 3
    arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\nFeatures\t: fp asimd sve\n"
    assert cpu_key(arm) != cpu_key(arm.replace(" sve", ""))


def test_the_extensions_directory_gets_this_cpus_key_once():
    assert keyed_extensions_dir("/r/.cache/torch_extensions", "cpu-aa") == "/r/.cache/torch_extensions/cpu-aa"
    assert keyed_extensions_dir("/r/ext/cpu-aa", "cpu-aa") == "/r/ext/cpu-aa"  # a child process keeps it
    assert keyed_extensions_dir("/r/ext/cpu-bb/", "cpu-aa") == "/r/ext/cpu-aa"  # inherited from another CPU
    assert keyed_extensions_dir(None, "cpu-aa").endswith("/torch_extensions/cpu-aa")  # torch's default root


def test_the_key_follows_the_python_torch_and_cuda_that_build_the_ops():
    """Two environments sharing a cache path (another torch, Python or CUDA, or another DeepSpeed install:
    torch rebuilds an op whose include paths changed) each build their own."""
    import sys

    import torch

    from ted_ds.host import this_build, this_cpu_key

    build = "python 3.11 torch 2.13.0+cpu cuda None"
    others = [build.replace("3.11", "3.12"), build.replace("2.13.0+cpu", "2.12.0+cu124"),
              build.replace("None", "12.4")]
    assert len({cpu_key(AMD, b) for b in [build, *others]}) == 4 and cpu_key(AMD, build) != cpu_key(AMD)
    deepspeed = os.path.dirname(importlib.util.find_spec("deepspeed").origin)  # importing it would set env vars
    assert this_build() == (f"python {sys.version_info.major}.{sys.version_info.minor} torch {torch.__version__} "
                            f"cuda {torch.version.cuda} deepspeed {deepspeed}")
    assert cpu_key(AMD, this_build()) != cpu_key(AMD, this_build().replace(deepspeed, "/other/venv/deepspeed"))
    assert this_cpu_key() == cpu_key(open("/proc/cpuinfo").read(), this_build())


def test_py_cpuinfo_is_asked_once_per_cpu_and_read_back_after(tmp_path, monkeypatch):
    """DeepSpeed's op builders call cpuinfo.get_cpu_info twice per op load, each a fresh interpreter (~1 s);
    after remember_cpu_info the first answer is kept in the op cache and every later call reads it."""
    import json

    import cpuinfo

    from ted_ds.host import remember_cpu_info

    monkeypatch.setattr(cpuinfo, "get_cpu_info", cpuinfo.get_cpu_info)  # restored after the test
    kept = tmp_path / "cpu-key" / "cpuinfo.json"
    remember_cpu_info(str(kept))
    asked = cpuinfo.get_cpu_info()
    assert json.loads(kept.read_text()) == asked and asked["flags"]
    kept.write_text(json.dumps({**asked, "flags": ["written-here"]}))
    remember_cpu_info(str(kept))  # a second call wraps py-cpuinfo's own function, not the first wrapper
    assert cpuinfo.get_cpu_info()["flags"] == ["written-here"]
    assert cpuinfo.get_cpu_info.asks.__module__ == "cpuinfo.cpuinfo"
