#!/usr/bin/env bash
# One GPU check for issue 25, in at most ~8 minutes on one GPU, with no internet: builds the CUDA
# kernels for this GPU, runs the CUDA tests, then prints every figure of the issue's table next
# to its target (bench/gpu_check.py), with the GPU's name and the date.
#
#   bash bench/gpu_check.sh                 # everything
#   GPU_CHECK_ARGS="--only kernels,attention" bash bench/gpu_check.sh
#
# Python packages beyond torch/transformers/numpy (FastAPI, uvicorn, ...) come from .whl/ when
# that folder holds wheels (bench/README.md, "GPU check", says how to fill and carry it).
# Logs go to $OUT when set (the device tool brings that folder back), else to a temp dir.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
start=$(date +%s)
budget_total=${GPU_CHECK_SECONDS:-480}
logs=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1

site=""
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  site=":/tmp/site"
fi
export PYTHONPATH="$PWD$site${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"

# 0. the 6B fp16 checkpoint the daemon loads (http and hf sections): written in the background,
# on a few cores at low priority, while the kernels build and the tests run
ckpt=${GPU_CHECK_CKPT:-}
ckpt_pid=""
if [ -z "$ckpt" ]; then
  ckpt=$(mktemp -d /tmp/gpu_check_6b.XXXXXX)
  OMP_NUM_THREADS=4 nice -n 19 python3 bench/make_checkpoint.py --shape 6b --dtype float16 \
    --out "$ckpt" >"$logs/checkpoint.log" 2>&1 &
  ckpt_pid=$!
fi

# 1. the kernels, for this GPU's architecture only (a build for every arch takes longer)
arch=$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}"
export CHATGLM_SERVE_KERNEL_CACHE="${CHATGLM_SERVE_KERNEL_CACHE:-/tmp/chatglm-kernels}"
python3 -m chatglm_serve.kernels.build --cuda 2>&1 | tee "$logs/build.log" || exit 1

# 2. the CUDA tests (a failure is reported, and the figures are still taken); GPU_CHECK_TESTS=0
# skips them
tests_rc=0
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -k "gpu or graph or cuda_cpu_split" \
    tests/kernels/test_cuda_sources.py tests/kernels/test_cuda_qmm.py \
    tests/kernels/test_cuda_attention.py tests/engine/test_cuda_graphs.py \
    tests/model/test_placement.py >"$logs/tests.log" 2>&1
  tests_rc=$?
  tail -n 15 "$logs/tests.log"
fi
if [ -n "$ckpt_pid" ] && ! wait "$ckpt_pid"; then
  echo "gpu_check: writing the checkpoint failed (see $logs/checkpoint.log)"
fi

# 3. the figures, in what is left of the budget
left=$((budget_total - ($(date +%s) - start) - 15))
# shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of flags
python3 bench/gpu_check.py --budget "$left" --ckpt "$ckpt" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$logs/figures.log"
figures_rc=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_rc, figures exit $figures_rc, $(($(date +%s) - start)) s in all"
[ "$tests_rc" -eq 0 ] && [ "$figures_rc" -eq 0 ]
