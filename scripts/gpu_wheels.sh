#!/usr/bin/env bash
# Collect into .whl/ (git-ignored) the Python wheels that a GPU machine with no network needs on
# top of its own image (Python 3.12, x86-64 Linux, torch/transformers/... already installed) to run
# ted-ds: DeepSpeed and the packages it and ted-ds import that the image lacks.
# On that machine, `. scripts/gpu_install.sh` installs them into /tmp/site (see that file).
#
#   bash scripts/gpu_wheels.sh            (or: make gpu-wheels)
#   GPU_WHEELS_EXTRAS=datasets bash scripts/gpu_wheels.sh   also HF `datasets` (+ dill, multiprocess):
#       only ted-prep's `save_to_disk` inputs need it; datasets wants pyarrow>=24 there.
#
# Versions are those of the project venv (.venv), so the GPU run uses the DeepSpeed/pydantic the CPU
# tests use. DeepSpeed ships on PyPI as a source distribution: it is built here into a pure-Python
# wheel with DS_BUILD_OPS=0 (no op is compiled; its CUDA ops JIT-compile on first use there, with
# nvcc and ninja). Idempotent: nothing is done when .whl/.stamp already names the same set.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DEST=.whl
MAX_MIB=${GPU_WHEELS_MAX_MIB:-60}
TARGET_PY=3.12
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64)

# Missing from the GPU image: DeepSpeed, its pydantic stack, hjson, and zstandard (ted-prep's .zst
# inputs, imported lazily). typing-extensions is there but maybe older than pydantic's floor
# (>=4.16); gpu_install.sh installs it only when the image's copy is too old.
PACKAGES=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions zstandard)
for extra in ${GPU_WHEELS_EXTRAS:-}; do
  case "$extra" in
    datasets) PACKAGES+=(datasets dill multiprocess) ;;
    *) echo "gpu-wheels: unknown extra '$extra' (known: datasets)" >&2; exit 2 ;;
  esac
done

# What the GPU image holds already (its 'Python packages already there' list, 2026-11-17): a
# requirement of a carried wheel must be carried too or be one of these.
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

[[ -x $PY ]] || { echo "gpu-wheels: $PY not found: run 'make' set-up first (scripts/setup_env.sh)" >&2; exit 1; }

# name==version of each, from the venv
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu-wheels: {name} is not installed in the venv; cannot tell which version to carry")
EOF
)
((${#PINS[@]} == ${#PACKAGES[@]})) || exit 1

stamp=$(
  echo "python=$TARGET_PY platforms=${PLATFORMS[*]}"
  echo "script=$(sha256sum "$0" | cut -d' ' -f1)"
  printf '%s\n' "${PINS[@]}" | sort
)
up_to_date() {
  [[ -f $DEST/.stamp && "$(sed '/^wheel /d' "$DEST/.stamp")" == "$stamp" ]] || return 1
  local f n=0
  while read -r f; do [[ -f $DEST/$f ]] || return 1; n=$((n + 1)); done < <(sed -n 's/^wheel //p' "$DEST/.stamp")
  # nothing but the stamped wheels (two versions of one package would stop the install there)
  [[ $n -gt 0 && $n -eq $(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l) ]]
}
if up_to_date; then
  echo "gpu-wheels: $DEST is up to date ($(ls "$DEST"/*.whl | wc -l) wheels, $(du -ch "$DEST"/*.whl | tail -1 | cut -f1))"
  exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/out"
quiet() { grep -v -e "^WARNING: Location" -e "^\s*$" || true; }

ds_pin=""
others=()
for p in "${PINS[@]}"; do
  if [[ $p == deepspeed==* ]]; then ds_pin=$p; else others+=("$p"); fi
done

# 1. DeepSpeed: sdist -> pure-Python wheel, no op compiled (torch from the venv is only read by setup.py)
echo "gpu-wheels: building $ds_pin (DS_BUILD_OPS=0)"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/sdist" "$ds_pin" 2>&1 | quiet
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$tmp/out" \
  "$tmp"/sdist/deepspeed-*.tar.gz 2>&1 | quiet
ds_whl=$(ls "$tmp"/out/deepspeed-*.whl)
[[ $ds_whl == *-py3-none-any.whl ]] || { echo "gpu-wheels: $ds_whl is not py3-none-any" >&2; exit 1; }
if unzip -l "$ds_whl" | grep -q -E '\.so(\.|$)'; then
  echo "gpu-wheels: $ds_whl holds compiled code; it must be pure Python" >&2; exit 1
fi

# 2. the others: binary wheels for CPython 3.12 on manylinux x86-64
echo "gpu-wheels: downloading ${others[*]}"
plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  "${plat_args[@]}" -d "$tmp/out" "${others[@]}" 2>&1 | quiet

# 3. checks: one wheel per package, each loadable by CPython 3.12 x86-64, every runtime requirement
#    carried (at a version that satisfies it) or in the GPU image, total size under the cap
PLATFORMS="${PLATFORMS[*]}" "$PY" - "$tmp/out" "$MAX_MIB" "$GPU_HAS" "${PINS[@]}" <<'EOF'
import os, sys, zipfile
from email.parser import Parser
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

out, max_mib, gpu_has, pins = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
plats = os.environ["PLATFORMS"].split()
supported = set(cpython_tags((3, 12), platforms=plats)) | set(compatible_tags((3, 12), "cp312", plats))
gpu_has = {canonicalize_name(n) for n in gpu_has}
want = {canonicalize_name(p.split("==")[0]): Version(p.split("==")[1]) for p in pins}
env = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3",
                               "implementation_name": "cpython", "platform_python_implementation": "CPython",
                               "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                               "platform_machine": "x86_64", "extra": ""}
errors, have, total = [], {}, 0
for f in sorted(os.listdir(out)):
    name, ver, _, tags = parse_wheel_filename(f)
    if name in have:
        errors.append(f"two wheels of {name}")
    have[name] = (ver, f)
    if not tags & supported:
        errors.append(f"{f}: no tag for CPython 3.12 on manylinux x86-64")
    if want.get(name) != ver:
        errors.append(f"{f}: expected {name}=={want.get(name)}")
    total += os.path.getsize(os.path.join(out, f))
for name in want.keys() - have.keys():
    errors.append(f"no wheel for {name}")
for name, (ver, f) in have.items():
    with zipfile.ZipFile(os.path.join(out, f)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    for r in map(Requirement, reqs):
        if r.marker and not r.marker.evaluate(env):
            continue
        dep = canonicalize_name(r.name)
        if dep in have:
            if not r.specifier.contains(have[dep][0], prereleases=True):
                errors.append(f"{name} needs {r}, carrying {dep}=={have[dep][0]}")
        elif dep not in gpu_has:
            errors.append(f"{name} needs {r}: neither carried nor in the GPU image")
if total > max_mib * 2**20:
    errors.append(f"{total / 2**20:.1f} MiB in all, over {max_mib:g} MiB")
if errors:
    sys.exit("gpu-wheels: " + "\n  ".join(["checks failed:"] + errors))
EOF

# 4. into place
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST/.stamp"
mv "$tmp"/out/*.whl "$DEST"/
{ echo "$stamp"; for f in "$DEST"/*.whl; do echo "wheel $(basename "$f")"; done; } > "$DEST/.stamp"
ls -s --block-size=K -1 "$DEST"/*.whl | sed 's/^/  /'
echo "gpu-wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -ch "$DEST"/*.whl | tail -1 | cut -f1) in $DEST"
