"""The CUDA-on-CPU emulator (tools/cuda_emu) itself: its source rewrite, its self-test (every intrinsic and every
reported error, under every thread order), and, in an emulated run (`make cuda-emu`), that the op tests' "emu"
cases really run the CUDA kernels."""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
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


def _op_results(generator_seed: int) -> dict[str, torch.Tensor]:
    """One call of every op (forward and the backward kernels) on fresh inputs; the emulator reads the device shape
    and thread order from the environment at every launch."""
    from epic_ext import ops  # noqa: PLC0415
    from helpers.token_data import make_batch  # noqa: PLC0415

    g = torch.Generator().manual_seed(generator_seed)
    query, key, positions, mask, span_start = make_batch(2, 8, 2, 3, 300, 64, torch.float32, "cpu", g, span=200)
    student = (torch.randn(9, 3001, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(9, 3001, generator=g) * 3
    loss = ops.temperature_kl(student, teacher, temperature=2.0)
    loss.backward()
    importance = ops.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    keep = ops.select_tokens(importance, span_start, 200, 50)
    hidden = torch.randn(2, 300, 40, generator=g, requires_grad=True)
    gathered = ops.gather_tokens(hidden, torch.cat([keep, keep[:, :7]], dim=1), dim=1)
    gathered.backward(torch.randn(gathered.shape, generator=g))
    return {"kl": loss.detach(), "kl_grad": student.grad, "importance": importance, "keep": keep,
            "gathered": gathered.detach(), "gather_grad": hidden.grad}


@pytest.mark.cuda_emu
@pytest.mark.skipif(not os.environ.get("EPIC_EXT_CUDA_EMU"), reason="not an emulated run (make cuda-emu)")
def test_results_do_not_depend_on_thread_or_block_order(monkeypatch):
    """A race-free kernel gives bit-identical results whatever order its threads and blocks run in."""
    results = {}
    for order in ("forward", "reverse", "random"):
        monkeypatch.setenv("CUDA_EMU_ORDER", order)
        results[order] = _op_results(0)
    for order in ("reverse", "random"):
        for name, value in results[order].items():
            assert torch.equal(value, results["forward"][name]), f"{name} differs between forward and {order}"


@pytest.mark.cuda_emu
@pytest.mark.skipif(not os.environ.get("EPIC_EXT_CUDA_EMU"), reason="not an emulated run (make cuda-emu)")
def test_device_shape_dependence(monkeypatch):
    """What the host code's launch heuristics may change from one GPU to another. attention_importance splits its
    work by SM count, which changes its summation order: equal to fp32 rounding, not bit for bit (README, Ops).
    Every other op, and the selection made from the scores here, is bit-identical."""
    results = {}
    for sms, l2, optin in ((1, 2 << 20, 48 << 10), (8, 6 << 20, 163 << 10), (132, 50 << 20, 227 << 10)):
        monkeypatch.setenv("CUDA_EMU_SMS", str(sms))
        monkeypatch.setenv("CUDA_EMU_L2_BYTES", str(l2))
        monkeypatch.setenv("CUDA_EMU_SMEM_OPTIN", str(optin))
        results[sms] = _op_results(1)
    for sms in (8, 132):
        for name, value in results[sms].items():
            if name == "importance":
                torch.testing.assert_close(value, results[1][name], rtol=2e-6, atol=1e-9)
            else:
                assert torch.equal(value, results[1][name]), f"{name} differs between 1 and {sms} SMs"
