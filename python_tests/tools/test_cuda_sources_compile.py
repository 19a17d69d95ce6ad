"""Every csrc/cuda/*.cu compiles with nvcc -c (warnings are errors), even where no GPU can run it."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

import epic_ext

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: CUDA sources not compiled")
@pytest.mark.skipif(
    bool(epic_ext.build_info().get("cuda_built")), reason="the installed build already compiled the CUDA kernels"
)
def test_every_cuda_source_compiles():
    assert CUDA_SOURCES, "no CUDA sources under csrc/cuda"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "nvcc_check.py")], capture_output=True, text=True, timeout=1500
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
