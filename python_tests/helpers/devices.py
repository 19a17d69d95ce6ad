"""The device list of the op tests: CUDA cases are collected everywhere and skipped, visibly, without a GPU; with
EPIC_EXT_CUDA_EMU set (`make cuda-emu`) an "emu" case runs the CUDA kernels on the CPU emulator."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch

import epic_ext

HAS_CUDA = torch.cuda.is_available() and epic_ext.extension_available() and epic_ext.build_info()["cuda_built"]
NO_CUDA_REASON = (
    "no CUDA device (or epic_ext built without CUDA kernels): CUDA case not run"
    if not HAS_CUDA
    else ""
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]),
]

cuda_emu = None
if os.environ.get("EPIC_EXT_CUDA_EMU"):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools" / "cuda_emu"))
    import torch_emu as cuda_emu  # noqa: E402

    cuda_emu.load(os.environ["EPIC_EXT_CUDA_EMU"])
    DEVICES.append(pytest.param("cpu", id="emu", marks=pytest.mark.cuda_emu))
