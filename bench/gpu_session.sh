#!/usr/bin/env bash
# The prepared script for a session lent a GPU (see bench/RESULTS.md): device calls of under
# 10 minutes each (the device tool's limit per command; about 15 minutes in all per session):
#   bash bench/gpu_session.sh 1     # the CUDA tests; a training step per strategy, measured peak
#                                   #   beside the planner's; streaming FPS of the distilled student
#   bash bench/gpu_session.sh 2     # the model, the VAE, CLIP and a whole preview
#   bash bench/gpu_session.sh 3     # no stalls (issue 31): the streaming loop and a training step
#                                   #   per strategy and saver under torch.cuda.set_sync_debug_mode,
#                                   #   streaming FPS compiled (CUDA graphs) against eager, the CUDA
#                                   #   tests of the compiled stream, the prefetch and the offloaded step
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
    3)  # in order of value: a later step may not fit the 10 minutes; each has its own limit
        run check_syncs 200 python bench/check_syncs.py --blocks 4 --compile-layers 6 --steps 2
        run streaming_compile 150 python bench/bench_streaming.py --no-cpu --compile off,reduce-overhead \
            --layers 6 --blocks 8
        run tests_cuda_issue31 120 python -m pytest -q tests/test_cuda.py -k "compiled or prefetched or offloaded"
        run streaming_compile_30 110 python bench/bench_streaming.py --no-cpu --compile off,reduce-overhead \
            --blocks 5
        ;;
esac
cat "$out/summary.txt"
