#!/usr/bin/env bash
# The one prepared script for a session lent a GPU (see bench/RESULTS.md): the CUDA path of
# the tests, then the benchmarks of the real 1.8B config. About 10 minutes on one H100.
#   bash bench/gpu_session.sh            # figures in $OUT (the device tool's folder) or bench/gpu_out
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench/gpu_out}"
mkdir -p "$out"
python -c "import av" 2>/dev/null || pip install -q -r requirements.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | tail -n 30 >> "$out/summary.txt"
}
run tests_cuda 240 python -m pytest -q tests/test_cuda.py tests/test_model_forward.py tests/test_training.py -m "not slow"
run model 150 python bench/bench_model.py --steps 5 --skip-tiny
run train_step 200 python bench/bench_train_step.py --steps 3
run vae 120 python bench/bench_vae.py --no-cpu
run clip 40 python bench/bench_clip.py --no-cpu
run preview 120 python bench/bench_preview.py
