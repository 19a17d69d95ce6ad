"""Property-based tests of epic_ext.ops.attention_importance against epic_ext.reference.attention_importance (fp64).

Random B, Hkv, group size, R, L (0, 1, odd, up to 257), D (odd, up to 97), dtypes, layouts (strided, transposed,
offset, expanded), values (ties, tiny, large, NaN, +-inf), query_positions (-1, 0, L - 1, repeats) and padding
masks (fully padded samples included); bad arguments must raise an error that names the argument.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers.devices import DEVICES
from epic_ext import ops, reference
from helpers.fuzz_strategies import HOSTILE_INTS, build_index, build_tensor, index_specs, sizes, tensor_specs

EPS32 = 2.0**-24


@st.composite
def attention_cases(draw):
    batch, kv_heads, group, rows = draw(sizes(0, 3)), draw(sizes(1, 3)), draw(sizes(1, 3)), draw(sizes(0, 4))
    length, head_dim = draw(sizes(0, 24, large=257)), draw(sizes(1, 12, large=97))
    query = draw(tensor_specs((batch, kv_heads * group, rows, head_dim)))
    key = draw(tensor_specs((batch, kv_heads, length, head_dim)))
    key["dtype"] = query["dtype"]  # the op requires one dtype for both
    case = {"query": query, "key": key, "scale": draw(st.one_of(st.none(), st.sampled_from([0.05, 1.0, 3.0])))}
    case["positions"] = (draw(index_specs(batch, rows, -1, length - 1)) if length and draw(st.booleans())
                         else None)
    if draw(st.booleans()):
        mode = draw(st.sampled_from(["random", "all real", "none real", "left padded"]))
        case["mask"] = {"mode": mode, "bits": draw(st.lists(st.booleans(), min_size=batch * length,
                                                            max_size=batch * length))}
    else:
        case["mask"] = None
    return case


def build_mask(spec: dict | None, batch: int, length: int, device: str) -> torch.Tensor | None:
    if spec is None:
        return None
    bits = torch.tensor(spec["bits"], dtype=torch.bool).view(batch, length)
    if spec["mode"] == "all real":
        bits[:] = True
    elif spec["mode"] == "none real":
        bits[:] = False
    elif spec["mode"] == "left padded":  # a padded prefix of random length per sample
        cut = bits.sum(dim=1, keepdim=True)
        bits = torch.arange(length)[None, :] >= cut
    return bits.to(device)


def check_case(case: dict, device: str) -> None:
    query, key = build_tensor(case["query"], device), build_tensor(case["key"], device)
    batch, length = key.shape[0], key.shape[2]
    positions = None if case["positions"] is None else build_index(case["positions"], device)
    mask = build_mask(case["mask"], batch, length, device)
    kwargs = dict(scale=case["scale"], query_positions=positions, key_padding_mask=mask)
    got = ops.attention_importance(query, key, **kwargs).cpu()
    want = reference.attention_importance(query, key, **kwargs).cpu()
    assert got.dtype == torch.float32 and got.shape == (batch, length)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    # A NaN never covers part of a sample: it reaches every position (or none).
    assert torch.all(torch.isnan(got).all(dim=1) | ~torch.isnan(got).any(dim=1))
    # fp32 scores are rounded relative to sum_d |q_d k_d| <= D max|q| max|k|; a probability moves by at most about
    # twice that error. Finite inputs only feed the bound (non-finite ones make whole samples NaN, checked above).
    def finite_max(x):
        x = x.double()
        return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).max().item() if x.numel() else 0.0

    head_dim = query.shape[3]
    scale = head_dim**-0.5 if case["scale"] is None else case["scale"]
    score_error = scale * head_dim * finite_max(query) * finite_max(key) * 4 * EPS32
    tol = 2e-6 + 4 * min(score_error, 1.0)
    finite = ~torch.isnan(want)
    assert torch.all((got.double() - want).abs()[finite] <= tol), ((got.double() - want).abs().max(), tol)


@pytest.mark.parametrize("device", DEVICES)
@given(case=attention_cases())
def test_matches_reference(device, case):
    check_case(case, device)


BAD_ARGUMENTS = ["query rank", "key rank", "dtype", "dtype mismatch", "batch", "head dim", "heads", "scale",
                 "query_positions dtype", "query_positions shape", "query_positions value", "key_padding_mask dtype",
                 "key_padding_mask shape", "zero head dim"]


@pytest.mark.parametrize("device", DEVICES)
@given(bad=st.sampled_from(BAD_ARGUMENTS), length=sizes(1, 9), hostile=st.sampled_from(HOSTILE_INTS + [-2]),
       position=st.integers(0, 4))
def test_bad_arguments_raise_naming_them(device, bad, length, hostile, position):
    variant = position % 4  # for the lists of four variants; "scale" has five
    query, key = torch.randn(2, 4, 3, 8, device=device), torch.randn(2, 2, length, 8, device=device)
    kwargs = {}
    name = {"query rank": "query", "key rank": "key", "dtype": "query", "dtype mismatch": "dtype", "batch": "batch",
            "head dim": "head dim", "heads": "heads", "zero head dim": "head dim"}.get(bad, bad.split()[0])
    if bad == "query rank":
        query = query[0] if variant % 2 else query[None]
    elif bad == "key rank":
        key = key[0] if variant % 2 else key[None]
    elif bad == "dtype":
        query, key = query.to([torch.float64, torch.int64, torch.bool, torch.int32][variant]), key.double()
    elif bad == "dtype mismatch":
        key = key.half() if variant % 2 else key.bfloat16()
    elif bad == "batch":
        key = torch.randn(3, 2, length, 8, device=device)
    elif bad == "head dim":
        key = torch.randn(2, 2, length, 7 + 2 * variant, device=device)
    elif bad == "heads":
        key = torch.randn(2, 3, length, 8, device=device)
    elif bad == "zero head dim":
        query, key = query[..., :0], key[..., :0]
    elif bad == "scale":
        kwargs["scale"] = [0.0, -1.0, float("nan"), float("inf"), "0.5"][position]
    elif bad == "query_positions dtype":
        kwargs["query_positions"] = torch.zeros(2, 3, dtype=[torch.int32, torch.float32, torch.bool, torch.int16]
                                                [variant], device=device)
    elif bad == "query_positions shape":
        kwargs["query_positions"] = torch.zeros([(2, 2), (3, 3), (2, 3, 1), (6,)][variant], dtype=torch.long,
                                                device=device)
    elif bad == "query_positions value":
        positions = torch.zeros(2, 3, dtype=torch.long, device=device)
        positions[variant % 2, variant % 3] = hostile if variant < 2 else length  # L itself is out of range
        kwargs["query_positions"] = positions
    elif bad == "key_padding_mask dtype":
        kwargs["key_padding_mask"] = torch.ones(2, length, dtype=[torch.float32, torch.long, torch.uint8,
                                                                  torch.int32][variant], device=device)
    elif bad == "key_padding_mask shape":
        kwargs["key_padding_mask"] = torch.ones([(2, length + 1), (1, length), (2, length, 1), (2,)][variant],
                                                dtype=torch.bool, device=device)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
        ops.attention_importance(query, key, **kwargs)
