#!/usr/bin/env bash
# Table 1 on one GPU: full-width ResNet-18 on the full Fashion-MNIST with BP, Pred-Sim and BLL,
# sized for about 10 minutes of an H100 (channels_last, bf16 autocast, a time budget per run).
#
#   bash experiments/gpu_table1.sh                                   # the defaults below
#   METHODS="bp fa predsim bll" MINUTES=5 bash experiments/gpu_table1.sh
#   TASKS=cifar10 ARCHS=resnet50 CIFAR_DIR=/data/cifar bash experiments/gpu_table1.sh
#   bash experiments/gpu_table1.sh --lr 0.004 --pred-weight 4        # the CPU budget's settings
#
# Knobs (environment, default): TASKS (fashion_mnist), ARCHS (resnet18), METHODS (bp predsim
# bll), SEEDS (0), MINUTES (2.6: a safety cap on the training + evaluation time of each run;
# a run stops after the epoch that uses it up, so 3 methods take at most about
# 3 x (2.6 min + one epoch) + start-up; MINUTES=0 removes the cap), EPOCHS (10: the vision
# tasks decay the learning rate to 0 over EPOCHS with a cosine, so choose EPOCHS such that
# the runs end before the cap -- an estimate of 10-15 s per epoch for the full ResNet-18 on
# an H100, not yet measured; read log.txt after a first run and adjust), WIDTH (1), BATCH (task default 128), LR (task default, Adam 1e-3), OUT ($OUT,
# else results/gpu), FASHION_DIR and CIFAR_DIR (see below), DEVICE (cuda) and AMP (1; DEVICE=cpu
# AMP=0 runs the same pipeline on a CPU). Extra arguments go to reproduce_table1.py.
#
# Data. Fashion-MNIST: FASHION_DIR, else /usr/share/datasets/fashion-mnist (Debian package
# dataset-fashion-mnist), else runs/data/fashion-mnist: copy the four idx files there before
# the run and carry that folder to the GPU machine (runs/ is git-ignored; 30 MB). CIFAR-10:
# CIFAR_DIR holding cifar-10-batches-py/ (170 MB, more than a carry allows), else the task's
# default ~/.cache/pyro_bll/cifar10.
#
# Results under $OUT: table1.md, table1.json, table1_curves.png, log.txt (every epoch's time
# and accuracy), runs/*/metrics.json and the GPU's name (gpu.txt). Checkpoints stay in
# runs/gpu_table1 on the GPU machine (135 MB per epoch for the full ResNet-18).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu}
TASKS=${TASKS:-fashion_mnist}
ARCHS=${ARCHS:-resnet18}
METHODS=${METHODS:-bp predsim bll}
SEEDS=${SEEDS:-0}
MINUTES=${MINUTES:-2.6}
EPOCHS=${EPOCHS:-10}
WIDTH=${WIDTH:-1}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-1}
RUNS=${RUNS:-runs/gpu_table1}
mkdir -p "$OUT"

if [[ -z "${FASHION_DIR:-}" ]]; then
  for d in /usr/share/datasets/fashion-mnist runs/data/fashion-mnist; do
    if [[ -e "$d/train-images-idx3-ubyte.gz" || -e "$d/train-images-idx3-ubyte" ]]; then
      FASHION_DIR=$d
      break
    fi
  done
fi
# the package must import from this checkout (an editable install may point elsewhere)
if ! python -c "import pyro_bll.models, pyro_bll.guides" 2>/dev/null; then
  pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true

args=(--tasks $TASKS --archs $ARCHS --methods $METHODS --seeds $SEEDS --epochs "$EPOCHS"
      --width "$WIDTH" --device "$DEVICE" --channels-last --threads 4
      --runs-dir "$RUNS" --results "$OUT")
if [[ "$AMP" == 1 ]]; then args+=(--amp); fi
if [[ "$MINUTES" != 0 ]]; then args+=(--max-minutes "$MINUTES"); fi
if [[ -n "${BATCH:-}" ]]; then args+=(--batch-size "$BATCH"); fi
if [[ -n "${LR:-}" ]]; then args+=(--lr "$LR"); fi
if [[ -n "${FASHION_DIR:-}" ]]; then args+=(--fashion-dir "$FASHION_DIR"); fi
if [[ -n "${CIFAR_DIR:-}" ]]; then args+=(--cifar-dir "$CIFAR_DIR"); fi

start=$(date +%s)
python experiments/reproduce_table1.py "${args[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
echo "wall time $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
for m in "$RUNS"/*/metrics.json; do
  d=$(basename "$(dirname "$m")")
  mkdir -p "$OUT/runs/$d" && cp "$m" "$OUT/runs/$d/"
done
