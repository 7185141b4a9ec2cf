#!/usr/bin/env bash
# Download the Python wheels bench/gpu_check.sh installs on a GPU machine that has torch,
# transformers and numpy but no internet (the device tool's image): the daemon's web stack, for
# CPython 3.12 on x86-64 manylinux, into DEST (default .whl). The versions are the ones this
# repository is tested with; anyio, h11, click, httpx, uvloop, pyyaml, safetensors, sentencepiece
# and prometheus-client are already on that image. See bench/README.md, "GPU check".
#
#   bash bench/gpu_wheels.sh [DEST]
set -euo pipefail

dest=${1:-.whl}
pkgs=(
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 sse-starlette==3.7.1
  pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1 python-dotenv==1.2.2
  typing-inspection==0.4.2 annotated-types==0.7.0
  uvicorn==0.55.0 httptools==0.9.0 opentelemetry-api==1.45.2
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${pkgs[@]}"
du -sh "$dest"
