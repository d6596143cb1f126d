#!/usr/bin/env bash
# The GPU check, one script for one short lease of a GPU machine:
#   1. the environment (GPU, driver, torch);
#   2. the benchmark's Omniglot 5-way rows on the GPU (ours vs the per-task loop, side by side);
#   3. the paper's full-length Omniglot 5-way 1-shot run (experiment=omniglot_5w1s, 100k
#      meta-iterations, then 10,000 test tasks) through trainer=ddp on the GPU, stopped after
#      RUN_SECONDS; rerunning the script (BENCHMARK=0) resumes it from its last checkpoint.
# Usage: OMNIGLOT=<folder with the two archives> OUT=<folder for the logs> benchmarks/gpu_check.sh
# Extra arguments go to train.py (e.g. algorithm.compile=true).
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
OMNIGLOT=${OMNIGLOT:-data/omniglot}
RUN_SECONDS=${RUN_SECONDS:-420}
RUN_DIR=${RUN_DIR:-outputs/runs/gpu_omniglot_5w1s}
TRAINER=${TRAINER:-ddp}  # ddp_cpu tries the script on a machine without a GPU
BENCHMARK=${BENCHMARK:-1}  # 0: skip step 2 (when rerunning to resume)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nproc
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/environment.txt"

if [ "$BENCHMARK" = 1 ]; then
    timeout 120 python3 benchmarks/benchmark.py --device cuda --only "Omniglot 5-way" --rounds 20 \
        2>&1 | tee "$OUT/benchmark.md"
fi

resume=()
if [ -f "$RUN_DIR/checkpoints/last.ckpt" ]; then
    resume=(ckpt_path="$RUN_DIR/checkpoints/last.ckpt")
fi
# Validation every 10k meta-iterations (it only monitors), a checkpoint every 2k.
timeout "$RUN_SECONDS" python3 train.py experiment=omniglot_5w1s trainer="$TRAINER" trainer.devices=1 \
    logger=csv dataset.root="$OMNIGLOT" dataset.num_workers=4 dataset.eval_batch_tasks=1000 \
    trainer.val_check_interval=10000 callbacks.model_checkpoint.every_n_train_steps=2000 \
    hydra.run.dir="$RUN_DIR" "${resume[@]}" "$@" \
    2>&1 | tr '\r' '\n' | grep -v -E '^\s*$' | tail -n 200 > "$OUT/train.log"
echo "train.py exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/train.log"
cp "$RUN_DIR"/results.json "$OUT/" 2>/dev/null
cp "$(find "$RUN_DIR/csv" -name metrics.csv | head -n 1)" "$OUT/" 2>/dev/null
ls -l --time-style=+%T "$RUN_DIR/checkpoints" 2>/dev/null | tee -a "$OUT/train.log"
