"""Shared fixtures and settings. Test helpers (assets, references, strategies, the device list) are in helpers/;
no test imports another test module or this file.

With EPIC_EXT_CUDA_EMU=<path of libepic_ext_cuda_emu.so> (set by `make cuda-emu`, tools/cuda_emu/emu.py), every
device-parametrised test also gets an "emu" case: CPU tensors, but the ops run their CUDA kernels on the CPU
emulator (tools/cuda_emu/torch_emu.py), compared against epic_ext.reference like the CUDA case. Any error the
emulator reports during such a case fails it, even where the test caught the exception.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import epic_ext
from helpers.devices import cuda_emu

# Property-based op tests (test_fuzz_*.py): `make test` runs the derandomized "ci" profile (fixed examples, bounded
# count); `make fuzz` runs "fuzz" (random, many examples; failures are saved in .hypothesis/ and replayed first).
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]
settings.register_profile("ci", derandomize=True, max_examples=250, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_FUZZ_HEALTH)
settings.register_profile("fuzz", max_examples=2500, deadline=None, print_blob=True,
                          suppress_health_check=_FUZZ_HEALTH)
settings.load_profile(os.environ.get("EPIC_EXT_HYPOTHESIS_PROFILE", "ci"))

def pytest_report_header(config):
    info = epic_ext.build_info()
    return [f"epic_ext build: {info}", f"torch {torch.__version__}, CUDA device: {torch.cuda.is_available()}"]


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    before = cuda_emu.error_count()
    with cuda_emu.kernels_on_cpu():
        yield
    reported = cuda_emu.errors_since(before)
    if reported:
        pytest.fail("cuda_emu reported:\n" + "\n".join(reported), pytrace=False)


@pytest.fixture(autouse=True)
def _require_extension():
    if not epic_ext.extension_available():
        pytest.fail(f"epic_ext extension not available: {epic_ext.build_info()['error']}")
