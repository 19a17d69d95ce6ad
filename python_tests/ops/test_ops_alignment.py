"""Views whose base is not 16-byte aligned while their row strides are: the kernels' vector paths must notice the base
and fall back (a GPU faults on a misaligned 16-byte load; x86 would forgive it, the CUDA emulator does not)."""

from __future__ import annotations

import pytest
import torch

from helpers.devices import DEVICES
from epic_ext import ops, reference


def rel_err(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_kl_misaligned_base(device, dtype):
    g = torch.Generator().manual_seed(21)
    values = (torch.randn(6, 1280, generator=g) * 3).to(dtype)
    # [6, 1280], row stride 1280 elements (a multiple of 16 bytes), base one element past an aligned address.
    student = torch.empty(6 * 1280 + 1, dtype=dtype, device=device)[1:].view(6, 1280).copy_(values)
    teacher = (torch.randn(6, 1280, generator=g) * 3).to(dtype).to(device)
    assert student.data_ptr() % 16 != 0 and (student.stride(0) * student.element_size()) % 16 == 0
    student.requires_grad_(True)
    loss = ops.temperature_kl(student, teacher, temperature=2.0, reduction="none")
    loss.backward(torch.ones_like(loss))
    truth = student.detach().clone().requires_grad_(True)
    ref = reference.temperature_kl(truth, teacher, temperature=2.0, reduction="none", compute_dtype=torch.float64)
    ref.backward(torch.ones_like(ref))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(loss, ref) < tol
    assert rel_err(student.grad, truth.grad) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_attention_importance_misaligned_base(device):
    g = torch.Generator().manual_seed(22)
    query = torch.empty(2 * 4 * 3 * 64 + 1, device=device)[1:].view(2, 4, 3, 64)
    query.copy_(torch.randn(2, 4, 3, 64, generator=g))
    key = torch.randn(2, 2, 90, 64, generator=g).to(device)
    assert query.data_ptr() % 16 != 0
    got = ops.attention_importance(query, key)
    assert rel_err(got, reference.attention_importance(query, key)) < 1e-5
