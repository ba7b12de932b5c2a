#!/usr/bin/env bash
# The prepared script for a session lent a GPU (see bench/RESULTS.md): two device calls of
# under 10 minutes each (the device tool's limit per command; about 15 minutes in all):
#   bash bench/gpu_session.sh 1     # the CUDA tests; a training step per strategy, measured peak
#                                   #   beside the planner's; streaming FPS of the distilled student
#   bash bench/gpu_session.sh 2     # the model, the VAE, CLIP and a whole preview
# Figures go to $OUT (the device tool's folder) or bench/gpu_out. No network is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/gpu_out}"
mkdir -p "$out"
run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit status $?" >> "$out/$name.txt"
    tail -n 30 "$out/$name.txt" >> "$out/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
case "${1:-1}" in
    1)
        run tests_cuda 120 python -m pytest -q tests/test_cuda.py
        run train_step 300 python bench/bench_train_step.py --steps 3
        run streaming 150 python bench/bench_streaming.py --no-cpu --blocks 10
        ;;
    2)
        run model 120 python bench/bench_model.py --steps 5 --skip-tiny
        run vae 150 python bench/bench_vae.py --no-cpu
        run clip 60 python bench/bench_clip.py --no-cpu
        run preview 200 python bench/bench_preview.py
        ;;
esac
cat "$out/summary.txt"
