"""Sizes at which the CUDA kernels' shared memory reaches the 48 KiB that a block gets without an opt-in. The limit
counts static and dynamic shared memory together; the CUDA emulator checks it (a GPU refuses such a launch)."""

from __future__ import annotations

import pytest
import torch

from helpers.devices import DEVICES
from epic_ext import ops, reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [12280, 12281, 12288])  # the last with its counters in shared memory, then not
def test_gather_backward_counters_at_the_shared_memory_limit(device, length):
    g = torch.Generator().manual_seed(length)
    index = torch.randint(-1, length, (2, 40), generator=g).to(device)
    grad = torch.randn(2, 40, 3, generator=g).to(device)
    got = torch.ops.epic_ext.gather_tokens_backward(grad, index, 1, length)
    x = torch.zeros(2, length, 3, dtype=torch.float64, requires_grad=True)
    reference.gather_tokens(x, index.cpu(), dim=1).backward(grad.double().cpu())
    torch.testing.assert_close(got.double().cpu(), x.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [184, 186, 188, 192])  # one key group: the tiles reach 48 KiB at 185-188
def test_attention_importance_tiles_at_the_shared_memory_limit(device, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    query = torch.randn(1, 4, 5, head_dim, generator=g).to(device)  # 20 rows per kv head: one key group
    key = torch.randn(1, 1, 70, head_dim, generator=g).to(device)
    try:
        got = ops.attention_importance(query, key)
    except RuntimeError as exc:  # a device with less shared memory (e.g. an emulated 48 KiB one) refuses it
        if "needs more shared memory than this device has" not in str(exc):
            raise
        pytest.skip(str(exc))
    expected = reference.attention_importance(query, key)
    torch.testing.assert_close(got.double().cpu(), expected.double().cpu(), rtol=1e-5, atol=1e-7)
