#!/usr/bin/env bash
# The CUDA checks in one go, for a machine with an NVIDIA GPU (run from the repository root):
#   bench/gpu_check.sh OUTDIR
# 1. the gpu-marked tests (bf16 and fp32 against the CPU, CUDA graphs, batches in flight, the real
#    server on CUDA); 2. the ceiling on CUDA for the seed-shaped and the bundled model (model alone;
#    the server's runtime in fp32, bf16, bf16 + CUDA graphs, and two batches in flight): the
#    in-process figures every end-to-end clips/s below is a share of; 3. the real server on the new
#    path (4 front ends, nvJPEG) under load at c=1..128, with its in-process ceiling measured in the
#    same run (of_ceiling) and the c=1 latency against the same work in-process;
# 4. the old path against the new on the seed-shaped model at c=1 8 32 64 128, one run per payload:
#    old = one process, CPU decoding in decode processes (FRONTENDS=1, GPU_DECODE=false);
#    new = 4 front ends, GPU decoding (FRONTENDS=4, GPU_DECODE's default); for JPEG multipart a third
#    side, one process with GPU decoding (FRONTENDS=1), tells the two changes apart; then base64 JSON
#    frames and /v2 binary uint8 tensors at the model's size (no decoding: the front ends alone);
# 5. self-tuned batches against MAX_BATCH_SIZE=1 on the new path at c=64 (seed-shaped model);
# 6. the bundled model, old path against new, JPEG at c=64 128;
# 7. decoding on the GPU: its pixel tests against the CPU path (the figures printed), and nvJPEG's
#    decode rate alone against the CPU decoders, with the bundled model's accuracy on its test split
#    from CPU- and GPU-decoded JPEGs (bench/gpu_decode.py).
# Every serve and compare level records the GPU's mean and max utilisation (nvidia-smi, every 200 ms)
# in its JSON ("gpu"). wrk is the client when it is on PATH; without it the Python client (about 5 ms
# of CPU a request, one core) caps what the new path can show, so give the machine wrk first
# (bench/README.md). Each step's JSON lands in OUTDIR; a step that fails is reported and the next one
# still runs. PYTHON picks the interpreter. About 8 minutes on one H200 (levels of 2 s, one round:
# steps 4-6 are about 4.5 minutes of it); 10 files (tar OUTDIR where a machine hands back fewer).
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
short=(--duration 2 --warmup 1 --rounds 1)
levels=(--concurrency 1 8 32 64 128)
old=FUSIONSERVE_FRONTENDS=1,FUSIONSERVE_GPU_DECODE=false
new=FUSIONSERVE_FRONTENDS=4

step "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
    (wrk --version 2>&1 | head -1) || echo 'no wrk: the Python client'; $py -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
step "gpu tests" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/app/test_cuda.py tests/e2e/test_cuda.py
for ckpt in seed models/weights/moving-digits-lstm.safetensors; do
    name=$(basename "$ckpt" .safetensors)
    step "ceiling $name" "$py" -m bench ceiling --checkpoint "$ckpt" --lengths 16 --min-time 0.2 \
        --no-preprocessing --out "$out/ceiling-$name-cuda.json"
done
step "serve seed, new path" "$py" -m bench serve --checkpoint seed --env FRONTENDS=4 "${levels[@]}" --rates \
    --duration 2 --warmup 1 --ceiling-time 0.3 --c1-pairs 3 --c1-pair-time 1 --c1-interleaved 100 \
    --out "$out/serve-seed-cuda.json"
step "compare seed old vs new path vs GPU decoding alone, JPEG" "$py" -m bench compare --checkpoint seed \
    --a "$old" --b "$new" --c FUSIONSERVE_FRONTENDS=1 "${levels[@]}" "${short[@]}" \
    --out "$out/compare-cuda-old-vs-new-jpeg.json"
for payload in json v2; do
    step "compare seed old vs new path, $payload" "$py" -m bench compare --checkpoint seed --payload "$payload" \
        --a "$old" --b "$new" "${levels[@]}" "${short[@]}" --out "$out/compare-cuda-old-vs-new-$payload.json"
done
step "compare self-tuned vs MAX_BATCH_SIZE=1, new path" "$py" -m bench compare --checkpoint seed --a "$new" \
    --b "$new,FUSIONSERVE_MAX_BATCH_SIZE=1" --concurrency 64 --duration 2 --warmup 1 --rounds 2 \
    --out "$out/compare-cuda-new-batch1.json"
step "compare bundled old vs new path, JPEG" "$py" -m bench compare --a "$old" --b "$new" --concurrency 64 128 \
    "${short[@]}" --out "$out/compare-cuda-bundled-old-vs-new.json"
step "gpu decode pixel tests" "$py" -m pytest -q -s -m gpu -p no:cacheprovider tests/app/test_gpu_decode.py
step "gpu decode rate and accuracy" "$py" -m bench gpu-decode --accuracy --min-time 0.5 --out "$out/gpu-decode.json"
exit $status
