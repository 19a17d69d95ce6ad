"""Property-based tests of epic_ext.ops.gather_tokens (values and gradients) against epic_ext.reference.

Random ranks 2-4, the gathered dim (positive or negative), L and K (0, 1, odd), dtypes (float, half, integer,
bool), layouts of x and index, index patterns (-1, 0, L - 1, repeats), values with NaN / +-inf, and incoming
gradients; bad arguments (hostile indices near int64's limits, dims out of range) must raise an error that names
the argument.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers.devices import DEVICES
from epic_ext import ops, reference
from helpers.fuzz_strategies import HOSTILE_INTS, build_index, build_tensor, index_specs, sizes, tensor_specs, with_layout

OTHER_DTYPES = {"float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
                "uint8": torch.uint8}
ACCUMULATION_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
                    torch.float64: 2.0**-53}


@st.composite
def gather_cases(draw):
    rank = draw(st.integers(2, 4))
    shape = [draw(sizes(0, 3))] + [draw(sizes(0, 5, large=97 if rank == 2 else 0)) for _ in range(rank - 1)]
    dim = draw(st.integers(1, rank - 1))
    length, keep = shape[dim], draw(sizes(0, 6))
    return {
        "x": draw(tensor_specs(tuple(shape))),
        "x_dtype": draw(st.one_of(st.none(), st.sampled_from(list(OTHER_DTYPES)))),  # None: the spec's float dtype
        "dim": dim - rank if draw(st.booleans()) else dim,
        "index": draw(index_specs(shape[0], keep, -1, length - 1)) if length else
        {"shape": [shape[0], keep], "entries": [-1] * (shape[0] * keep), "layout": "contiguous"},
        "grad_seed": draw(st.integers(0, 2**31 - 1)),
    }


def build_x(case: dict, device: str) -> torch.Tensor:
    x = build_tensor(case["x"], device)
    if case["x_dtype"] is not None:  # integer and bool values: round, and keep the layout
        dtype = OTHER_DTYPES[case["x_dtype"]]
        values = x.double().nan_to_num(0.0, 100.0, -100.0)
        converted = (values != 0) if dtype == torch.bool else values.round().clamp(0 if dtype == torch.uint8 else
                                                                                   -1000, 1000).to(dtype)
        x = with_layout(converted.contiguous(), case["x"]["layout"])
    return x


@pytest.mark.parametrize("device", DEVICES)
@given(case=gather_cases())
# Found by the fuzzer: reference.gather_tokens crashed on an empty gathered dim (L = 0, x.narrow(dim, 0, 1)).
@example(case={"x": {"shape": [0, 0], "dtype": "float32", "kind": "normal", "seed": 0, "specials": [],
                     "layout": "contiguous"}, "x_dtype": None, "dim": 1,
               "index": {"shape": [0, 0], "entries": [], "layout": "contiguous"}, "grad_seed": 0})
def test_matches_reference(device, case):
    x, index, dim = build_x(case, device), build_index(case["index"], device), case["dim"]
    got = ops.gather_tokens(x, index, dim=dim)
    want = reference.gather_tokens(x, index, dim=dim)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)
    if not x.is_floating_point():
        return
    # Gradients: repeated indices accumulate (in fp32 or better, then rounded once), -1 rows get nothing.
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(case["grad_seed"]),
                           dtype=torch.float64)
    leaf = x.detach().requires_grad_(True)
    ops.gather_tokens(leaf, index, dim=dim).backward(grad_out.to(x.dtype).to(device))
    ref_leaf = x.detach().double().requires_grad_(True)
    reference.gather_tokens(ref_leaf, index, dim=dim).backward(grad_out.to(x.dtype).double().to(device))
    repeats = max([case["index"]["entries"].count(v) for v in set(case["index"]["entries"]) if v >= 0] or [1])
    eps = ACCUMULATION_EPS[x.dtype]
    bound = repeats * grad_out.abs().max().item() if grad_out.numel() else 0.0
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad.cpu(), rtol=eps, atol=bound * 2e-7 + 1e-30)


BAD_ARGUMENTS = ["index value", "index dtype", "index shape", "dim value", "dim type", "x rank", "x type"]


@pytest.mark.parametrize("device", DEVICES)
@given(bad=st.sampled_from(BAD_ARGUMENTS), length=sizes(1, 9), hostile=st.sampled_from(HOSTILE_INTS),
       position=st.integers(0, 4))
def test_bad_arguments_raise_naming_them(device, bad, length, hostile, position):
    x = torch.randn(2, length, 3, device=device)
    index, dim = torch.zeros(2, 2, dtype=torch.long, device=device), 1
    name = {"x rank": "x", "x type": "x"}.get(bad, bad.split()[0])
    if bad == "index value":
        index[position % 2, position % 2] = hostile if position < 3 else [length, -2][position - 3]
    elif bad == "index dtype":
        index = index.to([torch.int32, torch.float32, torch.bool, torch.int16, torch.uint8][position])
    elif bad == "index shape":
        index = [torch.zeros(2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                 torch.zeros(2, 2, 1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                 torch.zeros((), dtype=torch.long)][position].to(device)
    elif bad == "dim value":
        dim = [0, 3, -3, -4, hostile if abs(hostile) > 3 else 2**40][position]
    elif bad == "dim type":
        dim = [1.0, 1.5, True, "1", None][position]
    elif bad == "x rank":
        x = x[0, :, 0]
    elif bad == "x type":
        x = x.tolist()
    with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
        ops.gather_tokens(x, index, dim=dim)
