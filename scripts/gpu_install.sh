# Run ON the GPU machine (no network), from the repo root, with .whl/ carried there (make gpu-wheels):
#
#   . scripts/gpu_install.sh || exit;  <your command>
#
# Installs the wheels of .whl/ into /tmp/site (pip --target: the image's own packages are untouched,
# torch and the rest are never reinstalled), skipping any wheel whose package the image already holds
# at a version that serves (typing-extensions, if the image's is new enough). Then exports
# PYTHONPATH=/tmp/site:<repo>:$PYTHONPATH and PATH=/tmp/site/bin:$PATH (the `deepspeed` launcher),
# sets TORCH_EXTENSIONS_DIR as the Makefile does (DeepSpeed's ops JIT-compile there on first use),
# and checks that `import deepspeed, hjson, pydantic` works. Re-running on a warm machine is quick:
# /tmp/site keeps a copy of .whl/.stamp and is reinstalled only when it differs.
# Executed (bash scripts/gpu_install.sh) rather than sourced, it installs and prints the export line.
# Settings: PYTHON (default python3), GPU_SITE (default /tmp/site), WHL_DIR (default <repo>/.whl).

_ted_gpu_install() {
  local repo py site whl
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  py=${PYTHON:-python3}
  site=${GPU_SITE:-/tmp/site}
  whl=${WHL_DIR:-$repo/.whl}
  if ! compgen -G "$whl/*.whl" >/dev/null; then
    echo "gpu_install: no wheels in $whl (run 'make gpu-wheels' here and carry .whl)" >&2
    return 1
  fi

  if [[ -f $site/.stamp && -f $whl/.stamp ]] && cmp -s "$site/.stamp" "$whl/.stamp"; then
    echo "gpu_install: $site is up to date"
  else
    # the wheels this machine needs: skip a package its image already has at a version that satisfies
    # every carried wheel's requirement on it and is not older than the carried one
    local -a pick
    mapfile -t pick < <(PYTHONPATH='' "$py" - "$whl" <<'EOF'
import os, sys, zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

whl = sys.argv[1]
files = sorted(f for f in os.listdir(whl) if f.endswith(".whl"))
carried = {parse_wheel_filename(f)[0]: (parse_wheel_filename(f)[1], f) for f in files}
needs = {}
for name, (ver, f) in carried.items():
    with zipfile.ZipFile(os.path.join(whl, f)) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for r in map(Requirement, Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []):
            if not r.marker or r.marker.evaluate({"extra": ""}):
                needs.setdefault(canonicalize_name(r.name), []).append(r)
for name, (ver, f) in sorted(carried.items()):
    try:
        have = Version(version(name))
    except PackageNotFoundError:
        have = None
    if have is not None and have >= ver and all(r.specifier.contains(have, prereleases=True) for r in needs.get(name, [])):
        print(f"gpu_install: {name}: the image's {have} serves (carried {ver}), skipped", file=sys.stderr)
        continue
    print(os.path.join(whl, f))
EOF
    ) || return 1
    ((${#pick[@]})) || { echo "gpu_install: the wheel selection failed" >&2; return 1; }
    rm -rf "$site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${pick[@]}" || { echo "gpu_install: pip install into $site failed" >&2; return 1; }
    [[ -f $whl/.stamp ]] && cp "$whl/.stamp" "$site/.stamp"
    echo "gpu_install: installed into $site: $(printf '%s\n' "${pick[@]##*/}" | cut -d- -f1-2 | tr '\n' ' ')"
  fi

  case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  case ":$PATH:" in *":$site/bin:"*) ;; *) export PATH="$site/bin:$PATH" ;; esac
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

  # sanity: the imports work, and every carried package's requirements are met here
  local out rc
  out=$("$py" - "$site" 2>&1 <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
from packaging.requirements import Requirement
from packaging.version import Version
import deepspeed, hjson, pydantic, pydantic_core  # noqa: F401,E401
problems = []
for d in distributions(path=[sys.argv[1]]):
    for r in map(Requirement, d.requires or []):
        if r.marker and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            v = Version(version(r.name))
        except PackageNotFoundError:
            problems.append(f"{d.metadata['Name']} needs {r}: missing")
            continue
        if not r.specifier.contains(v, prereleases=True):
            problems.append(f"{d.metadata['Name']} needs {r}: have {v}")
for p in problems:
    print("gpu_install: warning:", p)
print(f"gpu_install: ok: deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}, "
      f"torch {sys.modules['torch'].__version__}, python {sys.version.split()[0]}")
EOF
  )
  rc=$?
  printf '%s\n' "$out" | grep -v -e "real_accelerator.py" -e "^\[.*\] \[INFO\]" || true
  ((rc == 0)) || { echo "gpu_install: import check failed" >&2; return 1; }
  echo "export PYTHONPATH=$PYTHONPATH PATH=$site/bin:\$PATH TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
}

if (return 0 2>/dev/null); then
  _ted_gpu_install
  _ted_gpu_status=$?
  unset -f _ted_gpu_install
  return $_ted_gpu_status
else
  set -uo pipefail
  _ted_gpu_install
fi
