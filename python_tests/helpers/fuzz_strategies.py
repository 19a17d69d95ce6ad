"""Hypothesis strategies shared by the property-based op tests (python_tests/ops/test_fuzz_*.py).

A strategy draws a *spec*: a plain dict of ints, floats and strings (shapes, dtype names, a value kind, a seed,
special values at chosen flat positions, a memory layout). The test builds its tensors from the spec with a seeded
torch.Generator. Specs shrink to small readable cases, and a failing one can be pasted into `@example(...)` as is.

Profiles (registered in conftest.py): "ci", the default, derandomized with a bounded example count, runs in
`make test`; "fuzz" (`make fuzz`, or `pytest --hypothesis-profile=fuzz`) runs many random examples.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_DTYPE_NAMES = list(DTYPES)
# Value families: ordinary logits, large and tiny magnitudes, exact ties everywhere, small integers (many ties).
VALUE_KINDS = ["normal", "wide", "large", "tiny", "all_equal", "integers"]
LAYOUTS = ["contiguous", "strided", "transposed", "offset", "expanded"]
SPECIAL_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]


def sizes(low: int = 0, high: int = 9, large: int = 0) -> st.SearchStrategy[int]:
    """0, 1, small odd and even sizes; sometimes a larger odd one (up to `large`)."""
    small = st.integers(low, high)
    if large <= high:
        return small
    return st.one_of(small, small, small, st.sampled_from([s for s in (97, 131, 257, 1031, 4099) if low <= s <= large]))


@st.composite
def tensor_specs(draw, shape: tuple[int, ...], dtypes=FLOAT_DTYPE_NAMES, kinds=VALUE_KINDS, specials=True,
                 layouts=LAYOUTS) -> dict:
    """Spec of a floating tensor of `shape`: dtype, value kind, seed, special values, layout."""
    numel = math.prod(shape)
    spec = {
        "shape": list(shape),
        "dtype": draw(st.sampled_from(list(dtypes))),
        "kind": draw(st.sampled_from(list(kinds))),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "specials": [],
        "layout": draw(st.sampled_from(list(layouts))),
    }
    if specials and numel > 0 and draw(st.integers(0, 3)) == 0:
        spec["specials"] = draw(
            st.lists(st.tuples(st.integers(0, numel - 1), st.sampled_from(SPECIAL_VALUES)), min_size=1, max_size=3)
        )
    return spec


def values(kind: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """fp64 values of a kind (see VALUE_KINDS); every kind fits fp16 without overflow."""
    if kind == "normal":
        return torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    if kind == "wide":
        return torch.randn(shape, generator=generator, dtype=torch.float64) * 30
    if kind == "large":
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * 3e4
    if kind == "tiny":
        return torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-6
    if kind == "all_equal":
        return torch.full(shape, float(torch.randn(1, generator=generator)) * 5, dtype=torch.float64)
    if kind == "integers":
        return torch.randint(-3, 4, shape, generator=generator).double()
    raise ValueError(kind)


def with_layout(data: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a view into a larger or differently ordered buffer)."""
    shape = tuple(data.shape)
    if layout == "strided" and data.dim() >= 1:  # every other element of a buffer twice as wide
        buffer = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=data.dtype, device=data.device)
        view = buffer[..., ::2]
    elif layout == "transposed" and data.dim() >= 2:
        buffer = torch.zeros(shape[:-2] + (shape[-1], shape[-2]), dtype=data.dtype, device=data.device)
        view = buffer.transpose(-1, -2)
    elif layout == "offset":  # storage offset 3: rows are not 16-byte aligned
        buffer = torch.zeros(data.numel() + 3, dtype=data.dtype, device=data.device)
        view = buffer[3:].view(shape)
    elif layout == "expanded" and data.dim() >= 1 and shape[0] > 1:  # stride 0 over the batch: sample 0 repeated
        return data[:1].expand(shape)
    else:
        return data.clone()
    view.copy_(data)
    return view


def build_tensor(spec: dict, device: str = "cpu") -> torch.Tensor:
    """The tensor a spec describes. `expanded` repeats sample 0 (specials included) over the first dim."""
    generator = torch.Generator().manual_seed(spec["seed"])
    data = values(spec["kind"], spec["shape"], generator)
    flat = data.view(-1)
    for index, value in spec["specials"]:
        flat[index] = value
    data = data.to(DTYPES[spec["dtype"]]).to(device)
    return with_layout(data, spec["layout"])


@st.composite
def index_specs(draw, rows: int, cols: int, low: int, high: int) -> dict:
    """Spec of an int64 [rows, cols] index with entries in [low, high]: boundaries, repeats and -1 over-sampled."""
    edges = sorted({low, high, -1 if low <= -1 <= high else low, max(low, min(high, 0))})
    entry = st.one_of(st.integers(low, high), st.sampled_from(edges)) if high >= low else st.nothing()
    entries = draw(st.lists(entry, min_size=rows * cols, max_size=rows * cols)) if rows * cols else []
    return {"shape": [rows, cols], "entries": entries, "layout": draw(st.sampled_from(["contiguous", "strided",
                                                                                      "transposed", "offset"]))}


def build_index(spec: dict, device: str = "cpu") -> torch.Tensor:
    data = torch.tensor(spec["entries"], dtype=torch.long).view(spec["shape"]).to(device)
    return with_layout(data, spec["layout"])


# Out-of-range or malformed integers that index checks must reject without overflowing.
HOSTILE_INTS = [-(2**63), -(2**62), -2, 2**31, 2**32 + 1, 2**62, 2**63 - 2, 2**63 - 1]
