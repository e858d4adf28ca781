#!/usr/bin/env bash
# `make test-lowest`: the unit tests and the export tests against the LOWEST transformers and
# DeepSpeed that setup.py declares, in their own venv (.venv-lowest), so the declared ranges are
# ones that were run.  About 10 minutes on 2 cores (most of it pip).
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv-lowest
lowest() { sed -n "s/.*\"$1>=\([0-9.]*\)\".*/\1/p" setup.py; }
TRANSFORMERS=$(lowest transformers)
DEEPSPEED=$(lowest deepspeed)
echo "lowest declared: transformers==$TRANSFORMERS deepspeed==$DEEPSPEED"
[[ -x $V/bin/python ]] || "${PYTHON:-python3}" -m venv "$V"
$V/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
$V/bin/python -m pip install -q -c constraints-cpu.txt torch 2>&1 | grep -v "^WARNING: Location" || true
$V/bin/python -m pip install -q -c constraints-cpu.txt -e '.[dev,eval]' "transformers==$TRANSFORMERS" \
  "deepspeed==$DEEPSPEED" 2>&1 | grep -v -e "^WARNING: Location" -e "^\s*$" || true
$V/bin/python -c "import transformers, deepspeed; print('testing with transformers', transformers.__version__, \
'deepspeed', deepspeed.__version__)"
TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions-lowest $V/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_losses.py tests/test_taps.py tests/test_filters.py tests/test_heads.py tests/test_weights.py \
  tests/test_engine.py tests/test_config.py tests/test_teacher.py tests/test_checkpoint.py tests/test_launch.py \
  tests/test_distributed.py tests/test_losses_chunked.py tests/test_documents.py "tests/test_checkpoint_multirank.py" \
  -k "not multirank or export" "$@"
