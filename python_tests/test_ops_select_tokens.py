"""epic_ext.ops.select_tokens against reference.select_tokens (three stable sorts) on fresh random scores."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from epic_ext import ops, reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("span_length, keep", [(576, 128), (576, 64), (576, 1), (97, 41), (576, 576), (576, 0)])
def test_matches_reference(device, dtype, span_length, keep):
    g = torch.Generator().manual_seed(span_length * 1000 + keep)
    batch, length = 4, 700
    scores = torch.rand(batch, length, generator=g).to(dtype).to(device)
    span_start = torch.randint(0, length - span_length + 1, (batch,), generator=g).to(device)
    got = ops.select_tokens(scores, span_start, span_length, keep)
    expected = reference.select_tokens(scores, span_start, span_length, keep)
    assert got.shape == (batch, keep) and got.dtype == torch.long
    assert torch.equal(got.cpu(), expected.cpu())
    assert torch.all(got[:, 1:] > got[:, :-1]), "ascending and unique"
    assert torch.all(got >= span_start[:, None]) and torch.all(got < span_start[:, None] + span_length)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_lower_position(device):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (3, 300), generator=g).float().to(device)  # heavy ties
    span_start = torch.tensor([0, 17, 100], device=device)
    got = ops.select_tokens(scores, span_start, 200, 77)
    assert torch.equal(got.cpu(), reference.select_tokens(scores, span_start, 200, 77).cpu())
    constant = torch.ones(1, 50, device=device)
    assert ops.select_tokens(constant, torch.tensor([5], device=device), 40, 3).tolist() == [[5, 6, 7]]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_and_signed_zero(device):
    scores = torch.tensor([[0.0, float("nan"), -0.0, float("inf"), float("-inf"), 1.0, float("nan"), -2.0]],
                          device=device)
    start = torch.tensor([0], device=device)
    assert ops.select_tokens(scores, start, 8, 1).tolist() == [[3]]
    assert ops.select_tokens(scores, start, 8, 4).tolist() == [[0, 2, 3, 5]]  # 0.0 and -0.0 tie: both, by position
    assert ops.select_tokens(scores, start, 8, 6).tolist() == [[0, 2, 3, 4, 5, 7]]  # -inf before NaN
    assert ops.select_tokens(scores, start, 8, 7).tolist() == [[0, 1, 2, 3, 4, 5, 7]]  # first NaN first
    assert torch.equal(ops.select_tokens(scores, start, 8, 7).cpu(),
                       reference.select_tokens(scores, start, 8, 7).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_int_span_start_and_empty_batch(device):
    scores = torch.rand(2, 30, device=device)
    assert torch.equal(ops.select_tokens(scores, 4, 20, 5),
                       ops.select_tokens(scores, torch.tensor([4, 4], device=device), 20, 5))
    assert ops.select_tokens(torch.rand(0, 30, device=device), torch.zeros(0, dtype=torch.long, device=device),
                             20, 5).shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    scores = torch.rand(3, 50, device=device)
    torch.library.opcheck(torch.ops.epic_ext.select_tokens.default,
                          (scores, torch.tensor([0, 10, 20], device=device), 30, 7))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.rand(2, 30, 1), torch.tensor([0, 0]), 10, 5), "scores must be 2-D"),
        ((torch.rand(2, 30).long(), torch.tensor([0, 0]), 10, 5), "scores must be float32"),
        ((torch.rand(2, 30), torch.tensor([0, 0], dtype=torch.int32), 10, 5), "span_start must be int64"),
        ((torch.rand(2, 30), torch.tensor([0, 0, 0]), 10, 5), "span_start must have one entry per sample"),
        ((torch.rand(2, 30), torch.tensor([0, 21]), 10, 5), "must lie inside the sequence"),
        ((torch.rand(2, 30), torch.tensor([-1, 0]), 10, 5), "must lie inside the sequence"),
        ((torch.rand(2, 30), torch.tensor([0, 0]), 31, 5), "span_length must be in"),
        ((torch.rand(2, 30), torch.tensor([0, 0]), 10, 11), r"keep must be in \[0, span_length=10\]"),
        ((torch.rand(2, 30), torch.tensor([0, 0]), 10, -1), "keep must be in"),
    ],
)
def test_bad_arguments_name_the_argument(args, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.select_tokens(*args)
