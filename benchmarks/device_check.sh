#!/usr/bin/env bash
# One command for a GPU (or TPU) machine, under 8 minutes: the fused LoRA kernels compiled for
# real and checked against the XLA reference, then the timing sweep.
#
#   bash benchmarks/device_check.sh            # from the repository root, venv active or not
#
# Writes benchmarks/results/lora_kernels_check.json, lora_kernels.{json,md} (copied to $OUT when
# set, as the device runner collects that folder). Exits non-zero when a check fails; the
# benchmark still runs so the numbers come back either way.
set -u
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
PY=${PYTHON:-$(command -v python || command -v python3)}
RES=benchmarks/results
mkdir -p "$RES"
unset JAX_PLATFORMS  # use the accelerator
export XLA_PYTHON_CLIENT_PREALLOCATE=false
$PY -c "import jax; print(jax.__version__, jax.devices())" || { echo "jax cannot see a device"; exit 2; }
# kernels/ imports as jaxlearn.kernels only through the package mapping of an install; on a bare
# machine (its own jax/flax, no network) install the checkout itself, editable, without deps.
if ! $PY -c "import jaxlearn.kernels.lora" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-index --no-build-isolation -e . || { echo "cannot install jaxlearn"; exit 2; }
fi

status=0
# 1) correctness on the device: dense/int8/NF4, f32 (TF32 tolerance) and bf16, ragged shapes,
#    forward and all gradients, multi-adapter vs per-example loop (~1-2 min incl. compiles)
timeout 150 $PY benchmarks/lora_kernels.py --check --out "$RES" || status=1
# 2) timings: base matmul vs unfused XLA LoRA vs the fused kernel (+ int8/NF4), fwd+bwd, bf16;
#    results are rewritten after every shape, so a time-out still leaves the shapes done
timeout 270 $PY benchmarks/lora_kernels.py --quant --iters 10 --out "$RES" \
  --shapes "${LORA_BENCH_SHAPES:-4096,2048,2048,8;8192,4096,4096,16;16384,4096,4096,16;8192,4096,11008,16;8192,8192,8192,16;8192,4096,4096,64}" \
  || status=1
if [ -n "${OUT:-}" ]; then cp "$RES"/lora_kernels*.json "$RES"/lora_kernels.md "$OUT"/ 2>/dev/null; fi
echo "device_check status $status"
exit $status
