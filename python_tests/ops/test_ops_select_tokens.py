"""epic_ext.ops.select_tokens against reference.select_tokens (three stable sorts) on fresh random scores."""

from __future__ import annotations

import pytest
import torch

from helpers.devices import DEVICES
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


# ------------------------------------------------------------------------- issue 10: overflow and integer counts --
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [2**63 - 1, 2**63 - 5, 2**62, 2**63 - 20])
def test_span_start_near_int64_max_is_rejected(device, start):
    """start + span_length once wrapped around to a negative number that passed the check (garbage positions)."""
    scores = torch.randn(3, 20, device=device)
    with pytest.raises(RuntimeError, match="span_start"):
        ops.select_tokens(scores, torch.full((3,), start, device=device), 10, 4)
    with pytest.raises(RuntimeError, match="span_start"):
        ops.select_tokens(scores, torch.tensor([0, start, 3], device=device), 10, 4)
    with pytest.raises(RuntimeError, match="span_start"):  # the C++ check, without the Python wrapper
        torch.ops.epic_ext.select_tokens(scores, torch.full((3,), start, device=device), 10, 4)


def test_span_start_int_outside_int64_names_the_argument():
    with pytest.raises(ValueError, match="span_start must fit in int64"):
        ops.select_tokens(torch.randn(3, 20), 2**64, 10, 4)


@pytest.mark.parametrize(
    "span_length, keep, match",
    [
        (10, 4.7, "keep must be an integer"),
        (10, 4.0, "keep must be an integer"),
        (10, True, "keep must be an integer, got the bool"),
        (10, "4", "keep must be an integer"),
        (10, torch.tensor(4.0), "keep must be an integer"),
        (10, torch.tensor([1, 2]), "keep must be an integer"),
        (10.5, 4, "span_length must be an integer"),
        (False, 0, "span_length must be an integer, got the bool"),
        (10, -1, "keep must be in"),
        (10, 2**63, "keep must fit in int64"),
        (-3, 0, "span_length must be in"),
    ],
)
def test_non_integer_or_negative_counts_raise(span_length, keep, match):
    """keep=4.7 used to be truncated to 4 silently."""
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        ops.select_tokens(torch.randn(3, 20), torch.zeros(3, dtype=torch.long), span_length, keep)


def test_integer_like_counts_are_accepted():
    import numpy as np

    scores, start = torch.randn(3, 20), torch.tensor([0, 5, 10])
    expected = reference.select_tokens(scores, start, 10, 4)
    for span_length, keep in [(np.int64(10), np.int32(4)), (torch.tensor(10), torch.tensor(4))]:
        assert torch.equal(ops.select_tokens(scores, start, span_length, keep), expected)
    same_start = torch.full((3,), 3)
    assert torch.equal(ops.select_tokens(scores, np.int64(3), 10, 4), reference.select_tokens(scores, same_start, 10, 4))
