"""Benchmarks run with `make bench` (pytest-benchmark). Each file prints its table at the end and appends its rows
to bench/results/<name>.csv with the device, versions and commit."""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
