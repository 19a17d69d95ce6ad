"""Property-based tests of epic_ext.ops.temperature_kl against epic_ext.reference.temperature_kl (fp64).

Random shapes (N, M = 0, 1, odd; V up to 1031), independent student/teacher dtypes, layouts (strided, transposed,
offset, expanded), values (wide, large, tiny, ties, NaN, +-inf), row_index patterns (repeats, -1, 0 and M - 1),
temperatures down to the smallest accepted one, reductions, scales, and incoming gradients; bad arguments must
raise an error that names the argument. Found failures are kept as @example / plain tests (see README, Ops).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers.devices import DEVICES
from epic_ext import ops, reference
from helpers.fuzz_strategies import HOSTILE_INTS, build_index, build_tensor, index_specs, sizes, tensor_specs

EPS32 = 2.0**-24
DTYPE_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TEMPERATURES = [1.0, 0.5, 2.0, 0.05, 7.3, 1e3, 1e-30, 4.25e-39]


@st.composite
def kl_cases(draw, specials=True, kinds=None, large_vocab=4099):
    n = draw(sizes(0, 7))
    vocab = draw(sizes(1, 40, large=large_vocab))
    with_index = draw(st.booleans())
    m = draw(sizes(1, 7)) if with_index else n
    kw = {} if kinds is None else {"kinds": kinds}
    case = {
        "student": draw(tensor_specs((n, vocab), specials=specials, **kw)),
        "teacher": draw(tensor_specs((m, vocab), specials=specials, **kw)),
        "row_index": draw(index_specs(1, n, -1, m - 1)) if with_index else None,
        "temperature": draw(st.one_of(st.sampled_from(TEMPERATURES), st.floats(0.05, 10.0))),
        "scale": draw(st.one_of(st.none(), st.sampled_from([1.0, 0.25, -2.0, 3.5]))),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "grad_seed": draw(st.integers(0, 2**31 - 1)),
        # CPU row kernels: the AVX2 ones where the CPU has them (the default), or the portable ones.
        "cpu_kernels": draw(st.sampled_from(["default", "generic"])),
    }
    return case


def build(case: dict, device: str):
    student = build_tensor(case["student"], device)
    teacher = build_tensor(case["teacher"], device)
    row_index = None if case["row_index"] is None else build_index(case["row_index"], device)[0]
    kwargs = dict(temperature=case["temperature"], row_index=row_index, reduction=case["reduction"],
                  scale=case["scale"])
    return student, teacher, kwargs


def loss_and_grad(fn, student, grad_output, **kwargs):
    leaf = student.detach().requires_grad_(True)
    loss = fn(leaf, **kwargs)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), leaf.grad


def finite_range(x: torch.Tensor) -> torch.Tensor:
    """Per row, the largest finite |logit| (0 when none): what fp32 differences are rounded relative to."""
    x = x.double()
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(dim=1) if x.shape[1] else x[:, 0]


@contextlib.contextmanager
def cpu_kernels(choice: str):
    """EPIC_EXT_CPU_KERNELS=generic for the duration (read by the op on every call)."""
    saved = os.environ.get("EPIC_EXT_CPU_KERNELS")
    if choice == "generic":
        os.environ["EPIC_EXT_CPU_KERNELS"] = "generic"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EPIC_EXT_CPU_KERNELS", None)
        else:
            os.environ["EPIC_EXT_CPU_KERNELS"] = saved


def check_case(case: dict, device: str) -> None:
    with cpu_kernels(case.get("cpu_kernels", "default")):
        check_case_with_kernels(case, device)


def check_case_with_kernels(case: dict, device: str) -> None:
    student, teacher, kwargs = build(case, device)
    n, vocab = student.shape
    temperature = case["temperature"]
    scale = temperature**2 if case["scale"] is None else case["scale"]
    if abs(scale / temperature) > torch.finfo(torch.float32).max:  # the gradient factor does not fit fp32
        with pytest.raises(RuntimeError, match="scale / temperature must be finite in fp32"):
            ops.temperature_kl(student, teacher, **kwargs)
        return
    generator = torch.Generator().manual_seed(case["grad_seed"])
    grad_output = (torch.rand(n if case["reduction"] == "none" else (), generator=generator,
                              dtype=torch.float64) * 2 - 0.5).to(device)

    loss, grad = loss_and_grad(lambda s, **kw: ops.temperature_kl(s, teacher, **kw), student, grad_output, **kwargs)
    # The reference's gradient stays in fp64 (its rounding noise times scale / T may not fit the student's dtype).
    ref_loss, ref_grad = loss_and_grad(lambda s, **kw: reference.temperature_kl(s, teacher, **kw), student.double(),
                                       grad_output, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype and grad.shape == student.shape
    loss, ref_loss, grad, ref_grad = loss.cpu(), ref_loss.cpu(), grad.cpu().double(), ref_grad.cpu().double()

    # Per-row truth and tolerance: fp32 differences of logits are rounded relative to the row's largest |logit|.
    row_index = kwargs["row_index"]
    teacher_rows = teacher.cpu() if row_index is None else teacher.cpu()[row_index.cpu().clamp(min=0)]
    used = torch.ones(n, dtype=torch.bool) if row_index is None else row_index.cpu() >= 0
    logit_range = torch.maximum(finite_range(student.cpu()), finite_range(teacher_rows)) if n else torch.zeros(0)
    row_ref = reference.temperature_kl(student, teacher, temperature=temperature, row_index=row_index,
                                       reduction="none", scale=1.0).cpu()
    row_tol = abs(scale) * ((1e-5 + vocab * EPS32) * (1 + row_ref.abs().nan_to_num(0, 0, 0))
                            + 8 * EPS32 * logit_range / temperature)
    if case["reduction"] == "none":
        tol = row_tol
    else:
        tol = row_tol.sum() / (max(int(used.sum()), 1) if case["reduction"] == "mean" else 1)
        tol = tol + abs(scale) * 1e-6 * row_ref.abs().nan_to_num(0, 0, 0).sum()

    # The loss is fp32: a true value beyond fp32's range is +-inf there. So is each row's loss, before any reduction.
    ref_loss32 = ref_loss.float()
    row_over = used & torch.isfinite(row_ref) & ((scale * row_ref).abs() > torch.finfo(torch.float32).max)
    if case["reduction"] != "none" and bool(row_over.any()) and not torch.isnan(ref_loss):
        ref_loss32 = torch.tensor(math.copysign(math.inf, scale))
    assert torch.equal(torch.isnan(loss), torch.isnan(ref_loss32)), (loss, ref_loss)
    assert torch.equal(torch.isinf(loss), torch.isinf(ref_loss32)), (loss, ref_loss)
    assert torch.equal(loss[torch.isinf(loss)], ref_loss32[torch.isinf(ref_loss32)])
    finite = torch.isfinite(ref_loss32)
    tol = tol + ref_loss.abs().nan_to_num(0, 0, 0) * 2.0**-23 + 2.0**-149  # the fp32 result's own rounding
    assert torch.all((loss.double() - ref_loss)[finite].abs() <= (tol * torch.ones_like(ref_loss))[finite]), (
        loss, ref_loss, tol)

    # Gradient rows: ignored rows exactly 0; NaN rows NaN; rows with a finite loss close to the reference.
    if n == 0:
        return
    upstream = grad_output.cpu() if case["reduction"] == "none" else grad_output.cpu().expand(n)
    if case["reduction"] == "mean":
        upstream = upstream / max(int(used.sum()), 1)
    assert torch.all(grad[~used] == 0) and torch.all(ref_grad[~used] == 0)
    nan_rows = used & torch.isnan(row_ref)
    assert torch.isnan(grad[nan_rows]).all()
    ok_rows = used & torch.isfinite(row_ref)
    eps = DTYPE_EPS[student.dtype]
    grad_tol = abs(scale / temperature) * upstream.abs() * (2 * eps + 1e-5 + 8 * EPS32 * (1 + logit_range / temperature))
    # A gradient beyond the student dtype's range is +-inf there, as the fp64 truth rounded to that dtype is.
    ref_rounded = ref_grad.to(student.dtype).double()
    diff = torch.where(grad == ref_rounded, 0.0, (grad - ref_grad).abs()).amax(dim=1)
    assert torch.all(diff[ok_rows] <= grad_tol[ok_rows] + 1e-30), (diff, grad_tol)


def _spec(shape, dtype="float32", kind="normal", specials=(), layout="contiguous", seed=0):
    return {"shape": list(shape), "dtype": dtype, "kind": kind, "seed": seed, "specials": list(specials),
            "layout": layout}


def _case(student, teacher, temperature, scale=None, reduction="mean", row_index=None):
    return {"student": student, "teacher": teacher, "row_index": row_index, "temperature": temperature,
            "scale": scale, "reduction": reduction, "grad_seed": 0}


@pytest.mark.parametrize("device", DEVICES)
@given(case=kl_cases())
# What the fuzzer found (each was a wrong expectation of the test until the rule was written down, not an op bug):
# a gradient scale / T = 1e30 does not fit fp16 (op and fp64 truth both round to inf);
@example(case=_case(_spec((1, 97), "float16", seed=1), _spec((1, 97)), 1e-30, scale=1.0))
# a loss of 9.7e38 does not fit the fp32 result (inf);
@example(case=_case(_spec((2, 2)), _spec((1, 2)), 4.25e-39, scale=1.0,
                    row_index={"shape": [1, 2], "entries": [0, 0], "layout": "contiguous"}))
# a loss of 7.8e-45 is an fp32 subnormal, rounded to a multiple of 1.4e-45;
@example(case=_case(_spec((1, 2), kind="tiny"), _spec((1, 2), kind="tiny", specials=[(0, float("-inf"))]),
                    4.25e-39))
# scale / T = 4.7e38 is rejected (the gradient factor overflows fp32), NaN inputs or not;
@example(case=_case(_spec((1, 1), specials=[(0, float("nan"))]), _spec((1, 1), specials=[(0, float("nan"))]),
                    4.25e-39, scale=-2.0))
# the fp64 reference's own rounding noise times scale / T = 1e30 (true gradient 0) overflows fp16.
@example(case=_case(_spec((1, 3), "float16", "all_equal"), _spec((1, 3), kind="all_equal"), 1e-30, scale=1.0))
# and a real one: the mean of two rows of 3.2e38 was inf (the fp32 sum overflowed); rows are now summed in fp64
# (a row beyond fp32, here the second one at 3.5e38, stays inf, and so does the mean over it).
@example(case=_case(_spec((2, 97), kind="integers"), _spec((1, 97), seed=2), 4.25e-39, scale=0.25,
                    row_index={"shape": [1, 2], "entries": [0, 0], "layout": "contiguous"}))
def test_matches_reference(device, case):
    check_case(case, device)


@st.composite
def double_backward_cases(draw):
    case = draw(kl_cases(specials=False, kinds=["normal", "integers", "all_equal"], large_vocab=97))
    case["temperature"] = draw(st.sampled_from([1.0, 0.5, 2.0, 4.0]))
    case["direction_seed"] = draw(st.integers(0, 2**31 - 1))
    return case


@pytest.mark.parametrize("device", DEVICES)
@given(case=double_backward_cases())
def test_double_backward_matches_reference(device, case):
    """Hessian-vector products through create_graph=True, against the fp64 reference's."""
    student, teacher, kwargs = build(case, device)
    direction = torch.randn(student.shape, generator=torch.Generator().manual_seed(case["direction_seed"]),
                            dtype=torch.float64).to(device)

    def hvp(fn, x):
        leaf = x.detach().requires_grad_(True)
        loss = fn(leaf, teacher, **kwargs)
        (first,) = torch.autograd.grad(loss.sum(), leaf, create_graph=True)
        if not first.requires_grad:  # nothing depends on the student (N = 0, or every row ignored)
            return torch.zeros_like(x, dtype=torch.float64)
        (second,) = torch.autograd.grad((first * direction.to(first.dtype)).sum(), leaf, allow_unused=True)
        return torch.zeros_like(x, dtype=torch.float64) if second is None else second.double()

    got, want = hvp(ops.temperature_kl, student).cpu(), hvp(reference.temperature_kl, student).cpu()
    scale = case["temperature"] ** 2 if case["scale"] is None else case["scale"]
    # d2/ds2 is scale / T^2 * (diag(q) - q q^T): entries <= |scale| / T^2 * |direction|.
    bound = abs(scale) / case["temperature"] ** 2 * direction.abs().max().item() if direction.numel() else 0.0
    eps = DTYPE_EPS[student.dtype]
    torch.testing.assert_close(got, want, rtol=0, atol=bound * (4 * eps + 1e-5) + 1e-12)


# ------------------------------------------------------------------------------------------------ bad arguments --
BAD_ARGUMENTS = ["student rank", "teacher rank", "student dtype", "teacher dtype", "vocab mismatch",
                 "rows without row_index", "row_index dtype", "row_index shape", "row_index value", "temperature",
                 "scale", "reduction", "empty vocab", "student type"]


@pytest.mark.parametrize("device", DEVICES)
@given(bad=st.sampled_from(BAD_ARGUMENTS), n=sizes(1, 5), vocab=sizes(1, 9), hostile=st.sampled_from(HOSTILE_INTS),
       temperature=st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e-39, 4.2e-39, 1e-300, True]),
       scale=st.sampled_from([float("inf"), float("nan"), 1e300, True]), position=st.integers(0, 4))
def test_bad_arguments_raise_naming_them(device, bad, n, vocab, hostile, temperature, scale, position):
    student, teacher = torch.randn(n, vocab, device=device), torch.randn(n + 1, vocab, device=device)
    row_index = torch.arange(n, device=device)
    kwargs = dict(row_index=row_index)
    name = {"student rank": "student_logits", "teacher rank": "teacher_logits", "student dtype": "student_logits",
            "teacher dtype": "teacher_logits", "vocab mismatch": "teacher_logits", "rows without row_index":
            "row_index", "empty vocab": "student_logits", "student type": "student_logits"}.get(bad, bad.split()[0])
    if bad == "student rank":
        student = student[0] if position % 2 else student[None]
    elif bad == "teacher rank":
        teacher = teacher[0] if position % 2 else teacher[None]
    elif bad == "student dtype":
        student = student.to([torch.float64, torch.int64, torch.bool, torch.int32, torch.complex64][position])
    elif bad == "teacher dtype":
        teacher = teacher.to([torch.float64, torch.int64, torch.bool, torch.int32, torch.complex64][position])
    elif bad == "vocab mismatch":
        teacher = torch.randn(n + 1, vocab + 1 + position, device=device)
    elif bad == "rows without row_index":
        kwargs = {}
    elif bad == "row_index dtype":
        kwargs["row_index"] = row_index.to([torch.int32, torch.float32, torch.int16, torch.uint8, torch.bool][position])
    elif bad == "row_index shape":
        kwargs["row_index"] = row_index[None] if position % 2 else torch.zeros(n + 1, dtype=torch.long, device=device)
    elif bad == "row_index value":
        bad_value = hostile if position < 3 else (n + 1 if position == 3 else -2)  # teacher has n + 1 rows
        row_index = row_index.clone()
        row_index[position % n] = bad_value
        kwargs["row_index"] = row_index
    elif bad == "temperature":
        kwargs["temperature"] = temperature
    elif bad == "scale":
        kwargs["scale"] = scale
    elif bad == "reduction":
        kwargs["reduction"] = ["avg", "Mean", "", None, "batchmean"][position]
    elif bad == "empty vocab":
        student, teacher = student[:, :0], teacher[:, :0]
    elif bad == "student type":
        student = student.tolist()
    if bad == "scale" and scale == 1e300:
        kwargs["temperature"] = 1e-10  # scale / T overflows fp32
    with pytest.raises((RuntimeError, ValueError, TypeError), match=name):
        ops.temperature_kl(student, teacher, **kwargs)
