#!/usr/bin/env bash
# What bench/gpu_check.sh needs on a GPU machine that cannot reach a package index, fetched here:
#   bench/gpu_wheels.sh DIR [PYTHON_VERSION]     (default 3.12)
# The service's wheels that a CUDA image with torch, torchvision, numpy, pillow, safetensors, httpx,
# prometheus-client, pyyaml and uvloop lacks, at the versions in constraints.txt, for manylinux
# x86_64 and PYTHON_VERSION; and wrk with its LuaJIT library as Debian packages (apt-get download),
# the load generator bench/gpu_check.sh wants. On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   for d in DIR/*.deb; do dpkg -x "$d" /tmp/debs; done
#   PATH=/tmp/debs/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/debs/usr/lib/x86_64-linux-gnu \
#     PYTHONPATH=/tmp/site:$PWD bench/gpu_check.sh OUTDIR
set -eu
dir=${1:?usage: bench/gpu_wheels.sh DIR [PYTHON_VERSION]}
version=${2:-3.12}
mkdir -p "$dir"
names=(fastapi starlette uvicorn httptools websockets pydantic pydantic_core annotated-types typing-inspection
    typing_extensions pydantic-settings python-dotenv python-multipart multipart simplejpeg av fastapi-offline
    anyio)
pins=()
for name in "${names[@]}"; do
    pin=$(grep -i "^${name}==" constraints.txt) || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
(cd "$dir" && apt-get download -q wrk libluajit-5.1-2 2>/dev/null) || echo "no wrk packages: the Python client runs" >&2
du -sh "$dir"
