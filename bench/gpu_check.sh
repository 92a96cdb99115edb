#!/usr/bin/env bash
# The CUDA checks in one go, for a machine with an NVIDIA GPU (run from the repository root):
#   bench/gpu_check.sh OUTDIR
# 1. the gpu-marked tests (bf16 and fp32 against the CPU, CUDA graphs, batches in flight,
#    the real server on CUDA); 2. the ceiling on CUDA for the seed-shaped and the bundled
#    model (model alone; the server's runtime in fp32, bf16, bf16 + CUDA graphs, and two
#    batches in flight); 3. the real server under load (defaults: on CUDA, decoding in
#    processes), with its in-process ceiling measured in the same run; 4. A/B runs: decode
#    threads against the default processes, self-tuned against MAX_BATCH_SIZE=1 (seed-shaped
#    and bundled model), and fp32 without CUDA graphs against the defaults (bf16, graphs);
# 5. decoding on the GPU: its pixel tests against the CPU path (the figures printed), and nvJPEG's
#    decode rate against the CPU decoders with the bundled model's accuracy on its test split from
#    CPU- and GPU-decoded JPEGs (bench/gpu_decode.py).
# wrk is the client when it is on PATH (far less client CPU than the Python client). Each
# step's JSON lands in OUTDIR; a step that fails is reported and the next one still runs.
# PYTHON picks the interpreter. About 7 minutes on one H200; 10 files (tar OUTDIR where a
# machine hands back fewer).
set -u
out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
status=0
step() {
    echo "=== $1 ($(date +%T))"
    shift
    "$@" || { echo "=== FAILED (exit $?): $*"; status=1; }
}
short=(--duration 3 --warmup 1 --rounds 2)

step "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
    (wrk --version 2>&1 | head -1) || echo 'no wrk: the Python client'; $py -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
step "gpu tests" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/app/test_cuda.py
for ckpt in seed models/weights/moving-digits-lstm.safetensors; do
    name=$(basename "$ckpt" .safetensors)
    step "ceiling $name" "$py" -m bench ceiling --checkpoint "$ckpt" --lengths 16 --min-time 0.2 \
        --no-preprocessing --out "$out/ceiling-$name-cuda.json"
done
step "serve seed" "$py" -m bench serve --checkpoint seed --concurrency 1 8 32 64 128 --rates --duration 3 \
    --warmup 1 --ceiling-time 0.3 --c1-pairs 3 --c1-pair-time 1 --out "$out/serve-seed-cuda.json"
step "compare decode threads vs processes" "$py" -m bench compare --checkpoint seed \
    --a FUSIONSERVE_DECODE_PROCESSES=0 --b '' --concurrency 8 64 "${short[@]}" \
    --out "$out/compare-cuda-threads-vs-processes.json"
step "compare self-tuned vs MAX_BATCH_SIZE=1" "$py" -m bench compare --checkpoint seed --a '' \
    --b FUSIONSERVE_MAX_BATCH_SIZE=1 --concurrency 8 64 128 "${short[@]}" --out "$out/compare-cuda-batch1.json"
step "compare bundled self-tuned vs MAX_BATCH_SIZE=1" "$py" -m bench compare --a '' \
    --b FUSIONSERVE_MAX_BATCH_SIZE=1 --concurrency 64 128 "${short[@]}" --out "$out/compare-cuda-bundled-batch1.json"
step "compare fp32 eager vs bf16 + graphs" "$py" -m bench compare --checkpoint seed \
    --a FUSIONSERVE_PRECISION=fp32,FUSIONSERVE_CUDA_GRAPHS=false --b '' --concurrency 1 8 "${short[@]}" \
    --out "$out/compare-cuda-fp32-eager-vs-default.json"
step "gpu decode pixel tests" "$py" -m pytest -q -s -m gpu -p no:cacheprovider tests/app/test_gpu_decode.py
step "gpu decode rate and accuracy" "$py" -m bench gpu-decode --accuracy --min-time 0.5 --out "$out/gpu-decode.json"
exit $status
