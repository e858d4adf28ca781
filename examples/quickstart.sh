#!/usr/bin/env bash
# Quickstart: distil your teacher into a smaller student on your own corpus, end to end — shards,
# TED stage 1 on both models, TED stage 2, a KD baseline, an export and an evaluation of each model.
# Copy it and change the settings below (every key of run.yaml is documented in ted_ds/config.py).
#
#   TEACHER=/models/my-teacher CORPUS='corpus/**/*.jsonl' bash examples/quickstart.sh
#
# Each job has its own out_dir: its checkpoints, metrics.jsonl, config-<recipe>.yaml and outputs.
# A job interrupted (SIGTERM: exit 75) resumes when the same line is run again.  tests/test_quickstart.py
# runs this script on a tiny corpus and teacher.
set -euo pipefail

TEACHER=${TEACHER:?set TEACHER to the teacher: an HF directory with its weights, config and tokenizer}
CORPUS=${CORPUS:?set CORPUS to your documents: files, a directory or a glob of .txt, .jsonl or .parquet}
WORK=${WORK:-quickstart}                  # every output goes under here
GPUS=${GPUS:-8}                           # ranks on this host (on a CPU-only host: processes)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DS_CONFIG=${DS_CONFIG:-$HERE/ds_configs/zero3_bf16.json}   # zero3_cpu.json without a GPU
STUDENT_BLOCKS=${STUDENT_BLOCKS:-[1, 3]}  # teacher blocks copied into the student, one per student layer
TEACHER_EVERY=${TEACHER_EVERY:-2}         # tap teacher layer k·TEACHER_EVERY for student layer k
SEQ_LEN=${SEQ_LEN:-2048}
GLOBAL_BATCH=${GLOBAL_BATCH:-64}
MICRO_BATCH=${MICRO_BATCH:-4}
STAGE1_STEPS=${STAGE1_STEPS:-200}         # stage 1 trains only the filters: its own, higher LR and fewer steps
STAGE1_LR=${STAGE1_LR:-1e-2}
STEPS=${STEPS:-2000}
LR=${LR:-2e-3}
MIN_LR=${MIN_LR:-2e-4}
EVAL_SAMPLES=${EVAL_SAMPLES:-256}

# 1. packed shards, tokenized with the TEACHER's tokenizer (teacher, student and shards share it)
ted-prep build --input "$CORPUS" --tokenizer "$TEACHER" --out "$WORK/shards"
ted-prep verify "$WORK/shards"

# 2. one run config for every job; each job below names its own train.out_dir
mkdir -p "$WORK"
cat > "$WORK/run.yaml" <<EOF
teacher:
  path: $TEACHER
  filters: $WORK/stage1-teacher/filters-teacher   # what learn-filters --model teacher writes
student:
  init_from_teacher: $STUDENT_BLOCKS
  filters: $WORK/stage1-student/filters-student   # what learn-filters --model student writes
data:
  path: $WORK/shards
  seq_len: $SEQ_LEN
  eval_samples: $EVAL_SAMPLES
distill:
  method: ted
  teacher_every: $TEACHER_EVERY
  student_every: 1
optim:
  lr: $LR
  min_lr: $MIN_LR
  warmup_steps: $(( STEPS / 20 + 1 ))
train:
  deepspeed_config: $DS_CONFIG
  global_batch_size: $GLOBAL_BATCH
  micro_batch_size: $MICRO_BATCH
  steps: $STEPS
  log_interval: $(( STEPS / 20 + 1 ))
  eval_interval: $(( STEPS / 4 + 1 ))
  save_interval: $(( STEPS / 4 + 1 ))
EOF
run() { deepspeed --num_gpus "$GPUS" --master_port "${MASTER_PORT:-29500}" --module ted_ds "$@"; }
stage1=(optim.lr="$STAGE1_LR" optim.warmup_steps=1 train.steps="$STAGE1_STEPS")

# 3. TED stage 1: filters on the frozen teacher, then on the frozen student
run learn-filters --config "$WORK/run.yaml" --model teacher "${stage1[@]}" train.out_dir="$WORK/stage1-teacher"
run learn-filters --config "$WORK/run.yaml" --model student "${stage1[@]}" train.out_dir="$WORK/stage1-student"

# 4. TED stage 2, and the KD baseline (same student, data and steps) to compare it with
run distill --config "$WORK/run.yaml" train.out_dir="$WORK/ted"
run distill --config "$WORK/run.yaml" distill.method=kd train.out_dir="$WORK/kd"

# 5. export: a checkpoint as a standard HF directory, checked against it (the runs also wrote <out_dir>/hf)
ted-ds export "$WORK/ted" --out "$WORK/ted-export"

# 6. validation perplexity and bits per byte of each model, on the same windows
for model in "$TEACHER" "$WORK/ted-export" "$WORK/kd/hf"; do
  ted-ds eval "$model" --data "$WORK/shards" --seq-len "$SEQ_LEN" --max-samples "$EVAL_SAMPLES"
done
