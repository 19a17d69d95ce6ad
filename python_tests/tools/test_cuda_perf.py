"""The emulator's memory-traffic counters (tools/cuda_emu/PERF.md): calibration kernels with known figures, and
performance bugs planted in copies of csrc/cuda that the report must flag. Both build the perf variant of the
emulator with g++ (objects cached in build/cuda_emu/perf)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
import emu  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulator")

CALIBRATIONS = 11


def test_calibration_kernels_report_their_known_figures():
    binary = emu.build_selftest("perf")
    proc = subprocess.run([str(binary)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if "perf calibration" in ln]
    assert len(lines) == CALIBRATIONS, proc.stdout
    failed = [ln for ln in lines if not ln.startswith("ok")]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_planted_performance_bugs_are_flagged():
    import perf_planted  # noqa: PLC0415

    results = perf_planted.run()
    assert len(results) == len(perf_planted.BUGS) == 3
    missed = [f"{bug.name}: {failures}" for bug, failures in results if not any(bug.check in f for f in failures)]
    assert not missed, "\n".join(missed)
