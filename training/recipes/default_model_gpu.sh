#!/usr/bin/env bash
# The default model's GPU run: the predictor checked on CUDA, then two learning rates
# trained side by side on one GPU, each continuing from the shipped weights for MINUTES
# (or INIT) with WORKERS processes generating its patches (one core cannot feed a GPU).
#
#   OUT=folder bash training/recipes/default_model_gpu.sh
#
# Packages the machine lacks can lie as wheels in .whl/ (nibabel, nilearn); the models
# land in $OUT/gpu-<lr>/, logs in $OUT/*.log. Measure them on CPU with
# benchmarks/brain_model.py before shipping one.
set -euo pipefail
OUT=${OUT:-.runs/gpu}
MINUTES=${MINUTES:-6.5}
WORKERS=${WORKERS:-7}
BATCH=${BATCH:-8}
LRS=${LRS:-"6e-4 1.5e-3"}
INIT=${INIT:-brain-tissue-unet3d}
CHECK=${CHECK:-1}
PY=${PY:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# the package without installing it: napari_selfreg.training is the training/ folder
[ -e napari_selfreg/training ] || ln -s ../training napari_selfreg/training
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L || true
[ "$CHECK" = 0 ] || timeout 120 $PY benchmarks/gpu_check.py --device cuda --json "$OUT/gpu_check.json" 2>&1 || true
seed=${SEED:-30}
for lr in $LRS; do
    $PY training/recipes/default_model.py --init "$INIT" --minutes "$MINUTES" \
        --lr "$lr" --batch "$BATCH" --workers "$WORKERS" --device cuda --val-every 400 \
        --seed $seed --note "GPU run: batch $BATCH, $WORKERS generating processes, lr $lr" \
        --workdir "/tmp/gpu-run-$lr" --out "$OUT/gpu-$lr" >"$OUT/train-$lr.log" 2>&1 &
    seed=$((seed + 1))
done
wait
tail -n 4 "$OUT"/train-*.log
