#!/usr/bin/env bash
# make gpu-check: the one command for a machine with a GPU (about 8 minutes on an H100 / H200). Builds epic_ext with
# its CUDA kernels against the torch that is there, runs the op tests' CUDA cases, runs them again under
# compute-sanitizer (memcheck, racecheck, synccheck), runs the compressed-vs-reference model tests with flash
# attention where flash-attn is installed, and runs the benchmarks (bench/: temperature_kl vs copy
# bandwidth, eager, torch.compile and Liger-Kernel; the token ops vs eager attention + topk; the LLaVA-7B-shaped
# prefill; the TCD/SFT train step), whose rows land in bench/results/*.csv with the device name, and, where Nsight
# Compute is installed, records its memory counters next to the emulator's (tools/ncu_perf.py). A summary with every
# step's status and time goes to bench/results/gpu-check-<device>.md.
#
# The GPU machines have no network: `make gpu-wheels` (here) puts the DeepSpeed and Liger-Kernel wheels into
# build/gpu-wheels; carry that folder along and this script installs them first.
# Every step runs even when an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-build/gpu-wheels}
OPS_TESTS=(python_tests/ops/test_ops_*.py)
# racecheck and synccheck slow every kernel down a lot: the 152k-vocabulary case is left to memcheck.
SANITIZE_SELECT=${SANITIZE_SELECT:-"not large_vocab"}
start=$(date +%s)
status=0
summary=()

step() {
  local name=$1
  shift
  local t0
  t0=$(date +%s)
  echo "==== $name"
  if "$@"; then
    summary+=("| $name | ok | $(( $(date +%s) - t0 )) s |")
  else
    summary+=("| $name | FAILED | $(( $(date +%s) - t0 )) s |")
    status=1
  fi
}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step "install carried wheels" "$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
step "DeepSpeed and Liger-Kernel import" "$PYTHON" -c "import deepspeed, liger_kernel"
step "build (EPIC_EXT_CUDA=ON)" env EPIC_EXT_CUDA=ON TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
step "extension has CUDA kernels" "$PYTHON" -c \
  "import torch, epic_ext; i = epic_ext.build_info(); print(i, torch.cuda.get_device_name()); assert i['cuda_built']"
step "op tests, CUDA cases" "$PYTHON" -m pytest "${OPS_TESTS[@]}" -m cuda -q -p no:cacheprovider
# The compressed-vs-reference model tests under flash_attention_2 (fp16 on the GPU against the fp32 reference; they
# skip, and the summary says so, where the flash-attn package is not installed).
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
  step "model tests, flash_attention_2" "$PYTHON" -m pytest python_tests/models -m cuda -k flash_attention_2 -q \
    -p no:cacheprovider -rs
else
  echo "==== model tests, flash_attention_2: skipped, flash-attn is not installed"
  summary+=("| model tests, flash_attention_2 | skipped: no flash-attn | 0 s |")
fi
# Without the caching allocator every tensor is its own allocation, so memcheck sees out-of-bounds accesses that
# would otherwise land in a neighbouring tensor of the same pool block.
step "compute-sanitizer memcheck" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 1 "$PYTHON" -m pytest "${OPS_TESTS[@]}" -m cuda -q -p no:cacheprovider -x
for tool in racecheck synccheck; do
  step "compute-sanitizer $tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PYTHON" -m pytest "${OPS_TESTS[@]}" -m cuda -q -p no:cacheprovider -x -k "$SANITIZE_SELECT"
done
# Nsight Compute's counters for the op calls of `make cuda-perf` (tools/ncu_perf.py: sectors per request, bank
# conflicts, DRAM bytes, duration) next to the emulator's figures: bench/results/cuda_perf_ncu-<device>.md. Skipped,
# and said so in the summary, where ncu is not installed.
if "$PYTHON" -c "import sys; sys.path.insert(0, 'tools'); import ncu_perf; sys.exit(ncu_perf.find_ncu() is None)"; then
  step "ncu counters next to the emulator's" "$PYTHON" tools/ncu_perf.py report --require
else
  echo "==== ncu counters: skipped, Nsight Compute's ncu not found (PATH, /usr/local/cuda/bin, /opt/nvidia)"
  summary+=("| ncu counters next to the emulator's | skipped: no ncu | 0 s |")
fi
step "benchmarks" "$PYTHON" -m pytest bench -o python_files="bench_*.py" -p no:cacheprovider --benchmark-disable-gc -s

device=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')" \
  2>/dev/null | tr -c 'A-Za-z0-9._-\n' '_')
mkdir -p bench/results
{
  echo "# make gpu-check on ${device:-unknown} ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null))"
  echo
  echo "| step | result | time |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${summary[@]}"
  echo
  echo "Total: $(( $(date +%s) - start )) s. Benchmark rows: bench/results/*.csv."
} > "bench/results/gpu-check-${device:-unknown}.md"
cat "bench/results/gpu-check-${device:-unknown}.md"
exit $status
