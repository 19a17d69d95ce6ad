#!/usr/bin/env bash
# make cuda-link-check: builds epic_ext with EPIC_EXT_CUDA=ON against a CUDA torch in a separate venv (never the
# project's .venv), imports it (no GPU needed: it must link and load) and runs the CPU op tests (CUDA cases skip).
# Run it before resolving any change to csrc/cuda; the first run downloads the CUDA torch (~2.7 GB).
#
# torch 2.15.0's default Linux wheel is a CUDA 13.2 build (same major version as nvcc 13.0). This machine's global
# pip constraints cap torch lower; PIP_CONSTRAINT replaces them for these pip calls only.
set -euo pipefail
cd "$(dirname "$0")/.."
LINK_DIR=${LINK_DIR:-build/link-check}
TORCH_SPEC=${CUDA_TORCH:-torch==2.15.0}
PYTHON=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$LINK_DIR"
printf '%s\n' "$TORCH_SPEC" > "$LINK_DIR/constraints.txt"
export PIP_CONSTRAINT="$PWD/$LINK_DIR/constraints.txt"
# The venv is reused only when its creation finished (marker written last); an interrupted one is made again.
if [ ! -f "$LINK_DIR/venv/.created" ]; then
  rm -rf "$LINK_DIR/venv"
  "$PYTHON" -m venv "$LINK_DIR/venv"
  touch "$LINK_DIR/venv/.created"
fi
ROOT=$PWD
VPY="$ROOT/$LINK_DIR/venv/bin/python"
"$VPY" -m pip install -q "$TORCH_SPEC" scikit-build-core pybind11 cmake ninja numpy pytest
"$VPY" -c "import torch; assert torch.version.cuda, 'not a CUDA torch: ' + torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "cuda-link-check: torch ready after $(( $(date +%s) - start )) s"
# Its own CMake build folder: the project's build/{wheel_tag} belongs to the CPU build in .venv.
EPIC_EXT_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$VPY" -m pip install -q --no-build-isolation \
  --no-deps --config-settings=build-dir="$LINK_DIR/cmake" .
echo "cuda-link-check: built after $(( $(date +%s) - start )) s"
# From outside the source tree, so that the installed package (with its CUDA build) is the one imported.
(cd "$LINK_DIR" && "$VPY" -c "import epic_ext; info = epic_ext.build_info(); print(info); \
assert info['extension'] and info['cuda_built'], info")
(cd "$LINK_DIR" && "$VPY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  "$ROOT"/python_tests/ops/test_ops_*.py)
echo "cuda-link-check: done in $(( $(date +%s) - start )) s"
