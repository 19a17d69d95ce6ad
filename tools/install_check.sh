#!/usr/bin/env bash
# `make install-check`: follow README.md's "Installing into your own environment" in a fresh venv that holds only
# torch, then run the test suite against that regular install from outside the source tree (so the source tree
# cannot shadow the installed package). Takes about 10 minutes on the 2-core CI machine (a full build + the suite).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$ROOT/build/install-check"
PYTHON="${PYTHON:-python3}"
rm -rf "$WORK" && mkdir -p "$WORK"
"$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
# Our pins for every pip call below (the commands themselves stay as the README writes them).
export PIP_CONSTRAINT="$ROOT/constraints.txt"
export TORCH_EXTENSIONS_DIR="$ROOT/build/torch_extensions"
cd "$ROOT"
pip install --quiet torch
# --- the README's commands, verbatim ---
pip install -r requirements-build.txt
pip install --no-build-isolation ".[train]"
(cd / && python -c "import epic_ext; print(epic_ext.build_info())")
# --- the suite against the regular install ---
pip install --quiet -r requirements-dev.txt
cd "$WORK"
python -c "import epic_ext; assert 'site-packages' in epic_ext.__file__, epic_ext.__file__; \
assert epic_ext.extension_available(), epic_ext.build_info()"
python -m pytest -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" "$ROOT/python_tests" "$@"
