"""The CUDA-on-CPU emulator (tools/cuda_emu) itself: its source rewrite, its self-test (every intrinsic and every
reported error, under every thread order), and, in an emulated run (`make cuda-emu`), that the op tests' "emu"
cases really run the CUDA kernels."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
import emu  # noqa: E402


def test_rewrite_keeps_lines_and_names_the_kernel():
    source = (
        "__global__ void k(int* out) {\n"
        "  extern __shared__ __align__(16) float4 tiles[];\n"
        "}\n"
        "void host(int n) {\n"
        "  // not a launch: k<<<1, 2>>>(x)\n"
        "  k<float><<<dim3(n, 2), 256, n * 4,\n"
        "             stream>>>(nullptr);\n"
        "}\n"
    )
    out = emu.rewrite(source, "csrc/cuda/k.cu")
    lines = out.splitlines()
    assert lines[0] == '#line 1 "csrc/cuda/k.cu"'
    assert len(lines) == source.count("\n") + 1, "line structure kept"
    assert lines[2] == "  float4* const tiles = ::cuda_emu::dynamic_shared<float4>();"
    assert "// not a launch: k<<<1, 2>>>(x)" in lines[5]
    assert lines[6] == ('  k<float> * ::cuda_emu::launch_config("k<float>", __FILE__, __LINE__, dim3(n, 2), 256, '
                        "n * 4,")
    assert lines[7] == "             stream)(nullptr);"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_runtime_selftest_every_order():
    try:
        emu.cuda_include_dirs()
    except emu.BuildError as exc:
        pytest.skip(str(exc))
    assert emu.run_selftest("release") == 0


@pytest.mark.cuda_emu
@pytest.mark.skipif(not os.environ.get("EPIC_EXT_CUDA_EMU"), reason="not an emulated run (make cuda-emu)")
def test_emu_cases_run_the_cuda_kernels():
    """conftest runs this case inside torch_emu.kernels_on_cpu(), like every "emu" case of the op tests."""
    import torch_emu  # noqa: PLC0415  (loaded by conftest in an emulated run)

    from epic_ext import ops  # noqa: PLC0415

    before = torch_emu.launch_count()
    ops.select_tokens(torch.rand(2, 40), torch.tensor([0, 3]), 30, 5)
    assert torch_emu.launch_count() > before, "select_tokens did not launch an emulated kernel"
