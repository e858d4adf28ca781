#!/usr/bin/env bash
# Create the project virtualenv (.venv) and install ted-ds with everything the demo and the tests
# use: Debian packages (Open MPI, numactl, SLURM, munge, OpenSSH, pdsh) when run as root, the CPU
# build of torch, then the package itself with its extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(openmpi-bin libopenmpi-dev numactl slurmctld slurmd slurm-client openssh-server openssh-client pdsh iproute2)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: warning: system packages missing (${missing[*]}); MPI/SLURM/ssh tests will be skipped" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# CPU machines: the constraints file pins the CPU build of torch (see constraints-cpu.txt).
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e '.[dev,mpi,eval,bench]' 2>&1 \
  | grep -v -e "^WARNING: Location" -e "^\s*$" || true
.venv/bin/python -c "import torch, deepspeed, transformers, ted_ds, data_prep" 2>/dev/null \
  || { echo "setup: the install did not complete" >&2; exit 1; }
touch .venv/.ted-ds-installed
