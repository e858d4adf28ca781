#!/usr/bin/env bash
# One command for a person with one short GPU slot (one GPU, ~15 min in all, at most 10 min a command,
# no network), from the repo root, with .whl/ carried (make gpu-wheels):
#
#   bash scripts/gpu_slot.sh [BUDGET_S] [RESULTS_DIR]
#
# Installs the carried wheels (scripts/gpu_install.sh), then runs `python -m bench.gpu_check` with its
# sections in order (headline figures first) within BUDGET_S seconds (default 540: a 10-minute command
# with room to spare; the set-up's own time comes off it) and writes gpu_check.json, gpu_check.log and
# summary.txt into RESULTS_DIR (default $OUT, else bench/results/gpu/slot). The last line printed is
# the summary: student_mfu, student_vs_plain, ted_mfu, doc_attention_ratio and which sections ran,
# were reused or are left. The work directory (models, data, compiled kernels, each finished section's
# figures) is kept (GPU_CHECK_WORK, default bench.gpu_check's .cache/gpu-check): run the same command
# again on the same machine and it goes on with what is left. GPU_CHECK_ARGS: more options for the
# check (e.g. "--sections student,ted" or "--redo student").
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
results=${2:-${OUT:-bench/results/gpu/slot}}
mkdir -p "$results" || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
  . scripts/gpu_install.sh || exit 1
fi
left=$((budget - SECONDS))
work=()
[[ -n ${GPU_CHECK_WORK:-} ]] && work=(--work "$GPU_CHECK_WORK")
# shellcheck disable=SC2086  # GPU_CHECK_ARGS holds several options
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" -m bench.gpu_check "${work[@]}" --budget-s "$left" --out "$results" \
  ${GPU_CHECK_ARGS:-} 2>&1 | tee "$results/gpu_check.log"
rc=${PIPESTATUS[0]}
grep "^gpu-check summary:" "$results/gpu_check.log" | tail -1 > "$results/summary.txt"
cat "$results/summary.txt"
exit "$rc"
