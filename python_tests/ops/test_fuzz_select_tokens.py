"""Property-based tests of epic_ext.ops.select_tokens against epic_ext.reference.select_tokens (exact equality).

Random B, L (0, 1, odd, up to 1031), span lengths and keeps from 0 to the whole sequence, span starts at both
ends, score dtypes and layouts, values with many ties, NaN, +-inf and -0.0; bad arguments (hostile span starts
near int64's limits, non-integer counts) must raise an error that names the argument.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers.devices import DEVICES
from epic_ext import ops, reference
from helpers.fuzz_strategies import HOSTILE_INTS, build_index, build_tensor, sizes, tensor_specs


@st.composite
def select_cases(draw):
    batch, length = draw(sizes(0, 5)), draw(sizes(0, 40, large=1031))
    span_length = draw(st.one_of(st.integers(0, length), st.sampled_from([0, length])))
    keep = draw(st.one_of(st.integers(0, span_length), st.sampled_from([0, min(1, span_length), span_length])))
    last_start = length - span_length
    starts = draw(st.lists(st.one_of(st.integers(0, last_start), st.sampled_from([0, last_start])),
                           min_size=batch, max_size=batch))
    return {
        "scores": draw(tensor_specs((batch, length))),
        "span_start": {"shape": [batch, 1], "entries": starts,
                       "layout": draw(st.sampled_from(["contiguous", "strided", "offset", "expanded", "int"]))},
        "span_length": span_length,
        "keep": keep,
    }


def build_start(spec: dict, device: str):
    entries = spec["entries"]
    if spec["layout"] == "int":  # one int for every sample
        return entries[0] if entries else 0
    if spec["layout"] == "expanded":  # stride 0: sample 0's start everywhere
        return torch.tensor(entries[:1] or [0], device=device).expand(len(entries))
    return build_index(spec, device)[:, 0]


@pytest.mark.parametrize("device", DEVICES)
@given(case=select_cases())
def test_matches_reference(device, case):
    scores = build_tensor(case["scores"], device)
    start = build_start(case["span_start"], device)
    got = ops.select_tokens(scores, start, case["span_length"], case["keep"]).cpu()
    start_tensor = torch.full((scores.shape[0],), start) if isinstance(start, int) else start
    want = reference.select_tokens(scores, start_tensor, case["span_length"], case["keep"]).cpu()
    assert got.dtype == torch.long and got.shape == (scores.shape[0], case["keep"])
    assert torch.equal(got, want), (got, want)


BAD_ARGUMENTS = ["span_start value", "span_start int", "span_start dtype", "span_start shape", "span_length value",
                 "span_length type", "keep value", "keep type", "scores rank", "scores dtype"]


@pytest.mark.parametrize("device", DEVICES)
@given(bad=st.sampled_from(BAD_ARGUMENTS), length=sizes(1, 30), hostile=st.sampled_from(HOSTILE_INTS + [-1]),
       position=st.integers(0, 4))
def test_bad_arguments_raise_naming_them(device, bad, length, hostile, position):
    scores = torch.randn(3, length, device=device)
    start, span_length, keep = torch.zeros(3, dtype=torch.long, device=device), length, min(length, 2)
    name = {"scores rank": "scores", "scores dtype": "scores", "span_start int": "span_start"}.get(bad, bad.split()[0])
    if bad == "span_start value":  # hostile values, or just one past the end
        start[position % 3] = hostile if position < 3 else 1
    elif bad == "span_start int":
        start = hostile if position < 3 else [2**64, -(2**63) - 1][position - 3]
    elif bad == "span_start dtype":
        start = start.to([torch.int32, torch.float32, torch.bool, torch.int16, torch.float64][position])
    elif bad == "span_start shape":
        start = [torch.zeros(2, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                 torch.zeros((), dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)][position].to(device)
    elif bad == "span_length value":
        span_length = [length + 1, -1, hostile, 2**63 - 1, -(2**63)][position]
    elif bad == "span_length type":
        span_length = [float(length), length - 0.5, True, "3", None][position]
    elif bad == "keep value":
        keep = [length + 1, -1, hostile if hostile > length or hostile < 0 else -3, 2**63, -(2**63)][position]
    elif bad == "keep type":
        keep = [1.0, 4.7, True, torch.tensor(1.5), [1]][position]
    elif bad == "scores rank":
        scores = scores[0] if position % 2 else scores[None]
    elif bad == "scores dtype":
        scores = scores.to([torch.float64, torch.int64, torch.bool, torch.int32, torch.complex64][position])
    with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
        ops.select_tokens(scores, start, span_length, keep)
