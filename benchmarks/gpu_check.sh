#!/usr/bin/env bash
# The GPU check: everything the GPU issue measures, in one call of at most 8 minutes on one lent
# GPU machine (the parts' limits add up to 450 s, plus 10 s of grace each), each part's output in
# $OUT/<part>.txt:
#   environment  GPU, driver, torch, the CPU
#   end_to_end   train.py experiment=omniglot_5w1s end to end (data loading, logging,
#                checkpoints): fp32, bf16-mixed, bf16-mixed with the CUDA graph
#   test_10000   the 10,000-task test of the committed Omniglot 5-way run's checkpoint, timed
#   tests        the CUDA tests (tests/algorithms/test_cuda.py: the GPU's meta-gradients equal the
#                CPU's, a training step without a host sync, evaluation's memory budget;
#                test_compiled.py: training with the meta-step replayed as a CUDA graph reaches
#                the eager φ; tests/lightning: pinned meta-batches, the bar's refresh on a GPU)
#   steps        the benchmark's step rows on the GPU (Omniglot 5-/20-way, Mini-ImageNet; ours,
#                the per-task loop, bf16-mixed), random data of the datasets' shapes
#   concurrency  1, 2 and 4 such jobs at once on the one GPU: their aggregate rate
#
# The machine has no network and its own python3/torch/Lightning; hydra-core, omegaconf, antlr4,
# pytest-timeout and pytest-xdist (pyproject's `timeout` and `-n`) travel as wheels, Omniglot's
# archives as data/omniglot (15 MB). Prepared here with
#   echo /.whl/ >> .git/info/exclude
#   pip wheel --no-deps hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
#       pytest-timeout==2.4.0 pytest-xdist==3.8.0 execnet==2.1.2 -w .whl
#   mkdir -p data/omniglot && cp ../shared/data/omniglot/*.zip data/omniglot/
# and run through the device tool as
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "data/omniglot"], timeout_s=540)
# and commit what comes back in benchmarks/results-gpu.md. A dry run of the plumbing on a machine
# without a GPU: DEVICE=cpu STEPS=60 TASKS=20 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-outputs/gpu_check}
DATA=${DATA:-data}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-600}  # meta-iterations of each end-to-end run (5 logged intervals after warm-up)
TASKS=${TASKS:-10000}  # test tasks of the timed test
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

part() {  # part NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS, into $OUT/NAME.txt
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "## $name"
    # SIGTERM at the limit (train.py stops after its current batch), SIGKILL 10 s later.
    timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.txt"
    echo "($name: exit $status after $((SECONDS - start)) s)" | tee -a "$OUT/$name.txt"
}

# The figures the issue's done-when names first (end to end, the 10,000-task test), then the
# rest; each part's output survives its time limit. At 42 it/s eager, a 600-step run is about 40 s
# with start-up; the CUDA-graph run adds its compilation (the inductor cache is cold here).
part environment 20 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader; nproc; python3 -c "import torch, pytorch_lightning as pl;
print(\"torch\", torch.__version__, \"lightning\", pl.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")"'
part end_to_end 180 python3 benchmarks/benchmark.py --device "$DEVICE" --end-to-end --rounds 1 \
    --only "Omniglot 5-way" --steps "$STEPS" --data-dir "$DATA"
accelerator=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
part test_10000 70 python3 train.py experiment=omniglot_5w1s train=false \
    ckpt_path=benchmarks/paper/omniglot_5w/checkpoint.ckpt trainer.precision=32-true \
    trainer.accelerator="$accelerator" dataset.num_test_tasks="$TASKS" \
    dataset.eval_batch_tasks=2000 dataset.num_workers=8 paths.data_dir="$DATA" logger=csv \
    hydra.run.dir="$OUT/run_test"
# Its rate as logged, and its scores, beside its output.
python3 - "$OUT" >> "$OUT/test_10000.txt" <<'PY'
import csv, glob, json, sys
out = sys.argv[1]
rows = [r for f in glob.glob(f"{out}/run_test/csv/*/metrics.csv") for r in csv.DictReader(open(f))]
rate = [r["speed/test_tasks_per_s"] for r in rows if r.get("speed/test_tasks_per_s")]
print("test tasks/s:", rate[-1] if rate else "none logged")
results = glob.glob(f"{out}/run_test/results.json")
print(json.load(open(results[0])) if results else "no results.json: the test did not finish")
PY
tail -n 2 "$OUT/test_10000.txt"
rm -rf "$OUT/run_test"
# One process (-n 0): the memory-budget test measures the GPU's peak, which others would share.
part tests 80 python3 -m pytest -q -n 0 -p no:cacheprovider tests/algorithms/test_cuda.py \
    "tests/algorithms/test_compiled.py::test_compiled_training_reaches_the_eager_phi" -k "gpu or \
    not compiled" tests/lightning/test_datamodule.py tests/lightning/test_callbacks.py
part steps 45 python3 benchmarks/benchmark.py --device "$DEVICE" --rounds 10 --only=-way
part concurrency 55 python3 benchmarks/benchmark.py --device "$DEVICE" --end-to-end \
    --concurrency 1,2,4 --only "Omniglot 5-way" --steps "$STEPS" --data-dir "$DATA"
