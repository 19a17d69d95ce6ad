"""epic_ext.ops.gather_tokens: exact values against torch.gather, and its scatter-add backward."""

from __future__ import annotations

import pytest
import torch

from helpers.devices import DEVICES
from epic_ext import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_index(batch, keep, length, generator, pad=True, unique=True):
    rows = []
    for _ in range(batch):
        row = torch.randperm(length, generator=generator)[:keep] if unique else torch.randint(
            0, length, (keep,), generator=generator)
        row = row.sort().values
        if pad:
            row[torch.rand(keep, generator=generator) < 0.15] = -1
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.bool])
@pytest.mark.parametrize("layout", ["hidden", "kv"])
def test_values_exact(device, dtype, layout):
    g = torch.Generator().manual_seed(DTYPES.index(dtype) if dtype in DTYPES else 9)
    shape, dim = ((3, 700, 97), 1) if layout == "hidden" else ((2, 5, 700, 64), 2)
    x = (torch.randn(*shape, generator=g) * 10).to(dtype).to(device)
    index = random_index(shape[0], 191, 700, g).to(device)
    got = ops.gather_tokens(x, index, dim=dim)
    expected = reference.gather_tokens(x, index, dim=dim)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    for b in range(shape[0]):  # -1 rows are zeros
        pads = (index[b] == -1).nonzero().flatten()
        assert torch.all(got[b].narrow(dim - 1, 0, got.shape[dim]).index_select(dim - 1, pads) == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_dim_and_non_contiguous(device):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 64, 40, 3, generator=g).to(device)
    x = base.permute(0, 3, 2, 1)  # [2, 3, 40, 64], not contiguous
    index = random_index(2, 11, 40, g).to(device)
    assert torch.equal(ops.gather_tokens(x, index, dim=-2), reference.gather_tokens(x.contiguous(), index, dim=2))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64_with_repeats(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    index = torch.tensor([[0, 3, 3, -1, 8, 3], [1, -1, -1, 2, 2, 7]], device=device)
    assert torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, index, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.gather_tokens(t, index, 1), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_indices_accumulate(device, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 50, 16, generator=g).to(dtype).to(device).requires_grad_(True)
    index = random_index(3, 80, 50, g, unique=False).to(device)
    grad_out = torch.randn(3, 4, 80, 16, generator=g).to(dtype).to(device)
    ops.gather_tokens(x, index, dim=2).backward(grad_out)
    x64 = x.detach().double().requires_grad_(True)
    reference.gather_tokens(x64, index, dim=2).backward(grad_out.double())
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=1e-5 if tol else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading_pad", [0, 7])
def test_backward_with_a_non_decreasing_index(device, leading_pad):
    """A non-decreasing index (what compression produces) takes the CUDA backward's sort-free inverse, chosen per
    sample: sample 0 is non-decreasing with repeats (and leading -1 padding), sample 1 the same entries shuffled."""
    g = torch.Generator().manual_seed(6 + leading_pad)
    length, keep = 300, 90
    ascending = torch.randint(0, length, (keep,), generator=g).sort().values
    ascending[:leading_pad] = -1
    index = torch.stack([ascending, ascending[torch.randperm(keep, generator=g)]])
    grad = torch.randn(2, keep, 24, generator=g, dtype=torch.float64)
    got = torch.ops.epic_ext.gather_tokens_backward(grad.to(device), index.to(device), 1, length)
    x = torch.zeros(2, length, 24, dtype=torch.float64, requires_grad=True)
    reference.gather_tokens(x, index, dim=1).backward(grad)
    torch.testing.assert_close(got.cpu(), x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_cases(device):
    x = torch.randn(2, 10, 4, device=device, requires_grad=True)
    out = ops.gather_tokens(x, torch.zeros(2, 0, dtype=torch.long, device=device))
    assert out.shape == (2, 0, 4)
    out.sum().backward()
    assert torch.all(x.grad == 0)
    assert ops.gather_tokens(torch.randn(0, 10, 4, device=device),
                             torch.zeros(0, 3, dtype=torch.long, device=device)).shape == (0, 3, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 20, 8, generator=g).to(device).requires_grad_(True)
    index = random_index(2, 7, 20, g, unique=False).to(device)
    torch.library.opcheck(torch.ops.epic_ext.gather_tokens.default, (x, index, 2))
    torch.library.opcheck(torch.ops.epic_ext.gather_tokens.default, (x[:, 0], index, 1))
    grad = torch.randn(2, 3, 7, 8, generator=g).to(device).requires_grad_(True)
    torch.library.opcheck(torch.ops.epic_ext.gather_tokens_backward.default, (grad, index, 2, 20))


@pytest.mark.parametrize(
    "x_shape, index, dim, match",
    [
        ((4,), torch.zeros(4, 1, dtype=torch.long), 1, "x must have at least 2 dimensions"),
        ((2, 5, 3), torch.zeros(2, 2, dtype=torch.long), 0, "dim must index a non-batch dimension"),
        ((2, 5, 3), torch.zeros(2, 2, dtype=torch.long), 3, "dim must index a non-batch dimension"),
        ((2, 5, 3), torch.zeros(2, 2, dtype=torch.int32), 1, "index must be int64"),
        ((2, 5, 3), torch.zeros(2, dtype=torch.long), 1, "index must be 2-D"),
        ((2, 5, 3), torch.zeros(3, 2, dtype=torch.long), 1, r"index must have shape \[B, K\] with B=2"),
        ((2, 5, 3), torch.tensor([[0, 5], [0, 1]]), 1, r"index entries must be -1 \(zero row\) or in \[0, 5\)"),
        ((2, 5, 3), torch.tensor([[0, -2], [0, 1]]), 1, "index entries must be -1"),
        ((2, 5, 3), torch.zeros(2, 2, dtype=torch.long, device="meta"), 1, "index is on"),
    ],
)
def test_bad_arguments_name_the_argument(x_shape, index, dim, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.gather_tokens(torch.randn(*x_shape), index, dim=dim)


@pytest.mark.parametrize("dim, match", [(1.5, "dim must be an integer"), (True, "dim must be an integer, got the bool"),
                                        (2**70, "dim must fit in int64")])
def test_non_integer_dim_raises(dim, match):
    """dim=1.5 used to be truncated to 1."""
    with pytest.raises((TypeError, ValueError), match=match):
        ops.gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 2, dtype=torch.long), dim=dim)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_gathered_dim_matches_reference(device):
    """Found by the fuzz suite: the reference crashed when the gathered dim has length 0 (only -1 is valid)."""
    x = torch.randn(2, 0, 3, device=device, requires_grad=True)
    index = torch.full((2, 4), -1, device=device)
    got = ops.gather_tokens(x, index, dim=1)
    want = reference.gather_tokens(x, index, dim=1)
    assert got.shape == want.shape == (2, 4, 3) and torch.all(got == 0) and torch.all(want == 0)
    got.sum().backward()
    assert x.grad.shape == (2, 0, 3)
