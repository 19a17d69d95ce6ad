"""epic_ext.ops.temperature_kl against the fp64 reference on fresh random logits (CPU, and CUDA when present)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.devices import DEVICES
from epic_ext import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(n: int, v: int, dtype: torch.dtype, device: str, generator: torch.Generator, spread: float = 3.0):
    """Random logits with a realistic spread (a few large entries, as an LM head gives)."""
    x = torch.randn(n, v, generator=generator, dtype=torch.float64) * spread
    x += torch.randn(n, 1, generator=generator, dtype=torch.float64) * 5  # per-row offsets test the max shift
    return x.to(dtype).to(device)


def run_kernel(student, teacher, grad_output=None, **kwargs):
    """Loss and student gradient from epic_ext, for a loss multiplied by grad_output (default 1)."""
    student = student.detach().clone().requires_grad_(True)
    loss = ops.temperature_kl(student, teacher, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output)
    return loss.detach(), student.grad


def run_reference(student, teacher, grad_output=None, compute_dtype=torch.float64, **kwargs):
    """Same through the pure-torch reference, in compute_dtype (fp64 = the truth)."""
    student = student.detach().clone().requires_grad_(True)
    loss = reference.temperature_kl(student, teacher, compute_dtype=compute_dtype, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), student.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (fp64), robust to tiny gradients."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    denom = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (denom if denom > 0 else 1.0)


FP32_TOL = 2e-5  # fp32 math over up to 152k terms


# ----------------------------------------------------------------------------------------------- values, fp32 --
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [7, 1271, 32000, 32064])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_matches_fp64_reference(device, vocab, temperature):
    g = torch.Generator().manual_seed(vocab * 10 + int(temperature * 4))
    n = 9 if vocab > 2000 else 37
    student = make_logits(n, vocab, torch.float32, device, g)
    teacher = make_logits(n, vocab, torch.float32, device, g)
    loss, grad = run_kernel(student, teacher, temperature=temperature)
    ref_loss, ref_grad = run_reference(student, teacher, temperature=temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=FP32_TOL, abs_tol=1e-6)
    assert grad.dtype == torch.float32
    assert rel_err(grad, ref_grad) < FP32_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_large_vocab_152064_small_n(device):
    g = torch.Generator().manual_seed(152064)
    student = make_logits(3, 152064, torch.float32, device, g)
    teacher = make_logits(2, 152064, torch.float32, device, g)
    row_index = torch.tensor([1, -1, 0], device=device)
    loss, grad = run_kernel(student, teacher, temperature=2.0, row_index=row_index, reduction="none")
    ref_loss, ref_grad = run_reference(student, teacher, temperature=2.0, row_index=row_index, reduction="none")
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(grad, ref_grad) < FP32_TOL
    assert torch.all(grad[1] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_rows", [1, 2, 5, 33])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_row_counts(device, n_rows, reduction):
    g = torch.Generator().manual_seed(n_rows * 7 + len(reduction))
    student = make_logits(n_rows, 257, torch.float32, device, g)
    teacher = make_logits(n_rows, 257, torch.float32, device, g)
    grad_output = torch.rand((n_rows,) if reduction == "none" else (), generator=g).to(device) + 0.5
    loss, grad = run_kernel(student, teacher, grad_output, temperature=1.5, reduction=reduction)
    ref_loss, ref_grad = run_reference(student, teacher, grad_output, temperature=1.5, reduction=reduction)
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(grad, ref_grad) < FP32_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_grad_output_not_one_scales_gradient(device):
    g = torch.Generator().manual_seed(3)
    student = make_logits(6, 999, torch.float32, device, g)
    teacher = make_logits(6, 999, torch.float32, device, g)
    _, grad_1 = run_kernel(student, teacher, torch.tensor(1.0, device=device))
    _, grad_37 = run_kernel(student, teacher, torch.tensor(-3.7, device=device))
    _, ref_37 = run_reference(student, teacher, torch.tensor(-3.7, device=device))
    assert rel_err(grad_37, ref_37) < FP32_TOL
    assert rel_err(grad_37, -3.7 * grad_1) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale(device):
    g = torch.Generator().manual_seed(4)
    student = make_logits(5, 300, torch.float32, device, g)
    teacher = make_logits(5, 300, torch.float32, device, g)
    loss, grad = run_kernel(student, teacher, temperature=2.0, scale=0.3, reduction="sum")
    ref_loss, ref_grad = run_reference(student, teacher, temperature=2.0, scale=0.3, reduction="sum")
    assert rel_err(loss, ref_loss) < FP32_TOL and rel_err(grad, ref_grad) < FP32_TOL


# ------------------------------------------------------------------------------------------------- row_index --
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_index_permutation_repeats_and_ignored(device, reduction):
    g = torch.Generator().manual_seed(11)
    student = make_logits(13, 4099, torch.float32, device, g)
    teacher = make_logits(7, 4099, torch.float32, device, g)
    row_index = torch.tensor([6, 0, 3, -1, 3, 3, 5, -1, 1, 2, 4, 0, -1], device=device)
    loss, grad = run_kernel(student, teacher, temperature=2.0, row_index=row_index, reduction=reduction)
    ref_loss, ref_grad = run_reference(student, teacher, temperature=2.0, row_index=row_index, reduction=reduction)
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(grad, ref_grad) < FP32_TOL
    ignored = (row_index == -1).cpu()
    assert torch.all(grad.cpu()[ignored] == 0)
    if reduction == "none":
        assert torch.all(loss.cpu()[ignored] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_index_permutation_equals_permuted_teacher(device):
    g = torch.Generator().manual_seed(12)
    student = make_logits(10, 777, torch.float32, device, g)
    teacher = make_logits(10, 777, torch.float32, device, g)
    perm = torch.randperm(10, generator=g).to(device)
    loss_a, grad_a = run_kernel(student, teacher, row_index=perm, reduction="none")
    loss_b, grad_b = run_kernel(student, teacher[perm].contiguous(), reduction="none")
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(device, reduction):
    g = torch.Generator().manual_seed(13)
    student = make_logits(4, 100, torch.float32, device, g)
    teacher = make_logits(3, 100, torch.float32, device, g)
    row_index = torch.full((4,), -1, device=device)
    loss, grad = run_kernel(student, teacher, row_index=row_index, reduction=reduction)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    assert torch.all(grad == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, reduction):
    student = torch.empty(0, 50, device=device, requires_grad=True)
    teacher = torch.empty(0, 50, device=device)
    loss = ops.temperature_kl(student, teacher, reduction=reduction)
    assert not torch.isnan(loss).any()
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert student.grad.shape == (0, 50)


# ------------------------------------------------------------------------------------------------ -inf entries --
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_minus_inf_entries(device, dtype):
    g = torch.Generator().manual_seed(14)
    student = make_logits(6, 515, dtype, device, g)
    teacher = make_logits(6, 515, torch.float32, device, g)
    mask = torch.rand(6, 515, generator=g).to(device) < 0.3
    mask[:, 0] = False  # every row keeps a finite entry
    teacher = teacher.masked_fill(mask, float("-inf")).to(dtype)
    loss, grad = run_kernel(student, teacher, temperature=2.0, reduction="none")
    ref_loss, ref_grad = run_reference(student, teacher, temperature=2.0, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    assert rel_err(loss, ref_loss) < tol
    assert rel_err(grad, ref_grad) < tol


# ---------------------------------------------------------------------------------------------- layouts, dtypes --
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(15)
    wide = make_logits(8, 1300, torch.float32, device, g)
    student = wide[:, 3:1274]  # row stride 1300 != V
    teacher_t = make_logits(1271, 8, torch.float32, device, g)
    teacher = teacher_t.t()  # column-major: stride along V is 8
    assert not student.is_contiguous() and teacher.stride(1) != 1
    loss, grad = run_kernel(student, teacher, temperature=0.5)
    ref_loss, ref_grad = run_reference(student.contiguous(), teacher.contiguous(), temperature=0.5)
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=FP32_TOL)
    assert rel_err(grad, ref_grad) < FP32_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype", DTYPES)
@pytest.mark.parametrize("teacher_dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1271, 32000])
def test_low_precision_error_at_most_twice_plain_torch(device, student_dtype, teacher_dtype, vocab):
    """Kernel error vs fp64 must be <= 2x the error of plain torch computing in the student's dtype."""
    g = torch.Generator().manual_seed(vocab + 31 * DTYPES.index(student_dtype) + 7 * DTYPES.index(teacher_dtype))
    student = make_logits(7, vocab, student_dtype, device, g)
    teacher = make_logits(7, vocab, teacher_dtype, device, g)
    loss, grad = run_kernel(student, teacher, temperature=2.0, reduction="none")
    assert loss.dtype == torch.float32 and grad.dtype == student_dtype
    truth_loss, truth_grad = run_reference(student, teacher, temperature=2.0, reduction="none")
    plain_loss, plain_grad = run_reference(student, teacher, compute_dtype=None, temperature=2.0, reduction="none")
    if student_dtype == torch.float32:
        assert rel_err(loss, truth_loss) < FP32_TOL and rel_err(grad, truth_grad) < FP32_TOL
        return
    floor = 1e-6  # both errors can be ~0 on lucky rows
    assert rel_err(loss, truth_loss) <= 2 * rel_err(plain_loss, truth_loss) + floor
    assert rel_err(grad, truth_grad) <= 2 * rel_err(plain_grad, truth_grad) + floor


@pytest.mark.parametrize("student_dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 1271, 32003])
def test_portable_cpu_kernel_matches(monkeypatch, student_dtype, vocab):
    """The non-AVX2 CPU kernels (used on other CPUs) against fp64, including -inf and ignored rows."""
    monkeypatch.setenv("EPIC_EXT_CPU_KERNELS", "generic")
    g = torch.Generator().manual_seed(vocab)
    student = make_logits(5, vocab, student_dtype, "cpu", g)
    teacher = make_logits(4, vocab, torch.float32, "cpu", g)
    teacher[1, : vocab // 2] = float("-inf")
    row_index = torch.tensor([3, 1, -1, 0, 1])
    grad_output = torch.rand(5, generator=g) + 0.5
    loss, grad = run_kernel(student, teacher, grad_output, temperature=2.0, row_index=row_index, reduction="none")
    ref_loss, ref_grad = run_reference(student, teacher, grad_output, temperature=2.0, row_index=row_index,
                                       reduction="none")
    tol = FP32_TOL if student_dtype == torch.float32 else 1e-2
    assert rel_err(loss, ref_loss) < FP32_TOL
    assert rel_err(grad, ref_grad) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_propagate(device):
    student = torch.randn(3, 40, device=device)
    teacher = torch.randn(3, 40, device=device)
    student[1, 7] = float("nan")
    loss = ops.temperature_kl(student, teacher, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and torch.isfinite(loss[2])


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_gets_no_gradient(device):
    g = torch.Generator().manual_seed(16)
    student = make_logits(3, 64, torch.float32, device, g).requires_grad_(True)
    teacher = make_logits(3, 64, torch.float32, device, g).requires_grad_(True)
    ops.temperature_kl(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_mode_matches_and_skips_gradient(device):
    g = torch.Generator().manual_seed(17)
    student = make_logits(4, 333, torch.float32, device, g).requires_grad_(True)
    teacher = make_logits(4, 333, torch.float32, device, g)
    with torch.no_grad():
        loss_ng = ops.temperature_kl(student, teacher, reduction="none")
    loss = ops.temperature_kl(student, teacher, reduction="none")
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- torch.library checks --
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_row_index", [False, True])
def test_opcheck(device, with_row_index):
    g = torch.Generator().manual_seed(18)
    student = make_logits(5, 129, torch.float32, device, g).requires_grad_(True)
    teacher = make_logits(5, 129, torch.bfloat16, device, g)
    row_index = torch.tensor([4, -1, 0, 0, 2], device=device) if with_row_index else None
    torch.library.opcheck(torch.ops.epic_ext.temperature_kl.default, (student, teacher, row_index, 2.0, 4.0, True))
    grad = torch.randn(5, 129, generator=g).to(device)
    torch.library.opcheck(torch.ops.epic_ext.temperature_kl_backward.default, (grad, torch.rand(5).to(device)))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(19)
    student = make_logits(6, 301, torch.float32, "cpu", g).requires_grad_(True)
    teacher = make_logits(6, 301, torch.float32, "cpu", g)
    row_index = torch.tensor([0, 1, -1, 3, 4, 5])

    def loss_fn(s, t, r):
        return 0.3 * ops.temperature_kl(s, t * 1.5, temperature=2.0, row_index=r) + (s * s).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, row_index)
    loss.backward()
    got = student.grad.clone()
    student.grad = None
    expected = loss_fn(student, teacher, row_index)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, student.grad, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------- bad arguments --
def _bad_call(student, teacher, **kwargs):
    return lambda: ops.temperature_kl(student, teacher, **kwargs)


@pytest.mark.parametrize(
    "make_call, match",
    [
        (lambda s, t: _bad_call(s[0], t), "student_logits must be 2-D"),
        (lambda s, t: _bad_call(s, t.unsqueeze(0)), "teacher_logits must be 2-D"),
        (lambda s, t: _bad_call(s, t[:, :-1]), "same vocabulary size"),
        (lambda s, t: _bad_call(s, t[:-1]), "without row_index"),
        (lambda s, t: _bad_call(s.int(), t), "student_logits must be float32, bfloat16 or float16"),
        (lambda s, t: _bad_call(s, t.double()), "teacher_logits must be float32, bfloat16 or float16"),
        (lambda s, t: _bad_call(s, t, row_index=torch.zeros(4, dtype=torch.int32)), "row_index must be int64"),
        (lambda s, t: _bad_call(s, t, row_index=torch.zeros(3, dtype=torch.long)), "row_index must have one entry"),
        (lambda s, t: _bad_call(s, t, row_index=torch.zeros(4, 1, dtype=torch.long)), "row_index must be 1-D"),
        (lambda s, t: _bad_call(s, t, row_index=torch.tensor([0, 1, 4, 2])), r"row_index entries must be -1"),
        (lambda s, t: _bad_call(s, t, row_index=torch.tensor([0, -2, 1, 2])), r"row_index entries must be -1"),
        (lambda s, t: _bad_call(s, t, temperature=0.0), "temperature must be"),
        (lambda s, t: _bad_call(s, t, temperature=-1.0), "temperature must be"),
        (lambda s, t: _bad_call(s, t, reduction="avg"), "reduction must be one of"),
        (lambda s, t: _bad_call(s, [[1.0]]), "teacher_logits must be a torch.Tensor"),
        (lambda s, t: _bad_call(s, t, row_index=[0, 1, 2, 3]), "row_index must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_argument(make_call, match):
    student = torch.randn(4, 10)
    teacher = torch.randn(4, 10)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        make_call(student, teacher)()


def test_bad_temperature_reaches_kernel_check():
    """The C++ check also names the argument (callers of torch.ops bypass the Python wrapper)."""
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        torch.ops.epic_ext.temperature_kl(s, t, None, 0.0, 1.0, False)


def test_tensors_on_different_devices():
    other = "cuda" if torch.cuda.is_available() else "meta"
    s = torch.randn(2, 5, device=other)
    t = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="teacher_logits is on|student_logits is on"):
        ops.temperature_kl(s, t)
    with pytest.raises(RuntimeError, match="row_index is on"):
        ops.temperature_kl(s, t.to(other), row_index=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------ issue 10: double backward --
def _hessian_vector(fn, student, teacher, direction, **kwargs):
    """d/d student of <d loss / d student, direction>, through create_graph=True (what a gradient penalty does)."""
    student = student.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(student, teacher, **kwargs), student, create_graph=True)
    (second,) = torch.autograd.grad((grad * direction.to(grad.dtype)).sum(), student)
    return grad.detach(), second


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_matches_reference(device, reduction):
    """A gradient of the gradient used to be silently 0.0 (reference 0.0163)."""
    g = torch.Generator().manual_seed(31)
    student = make_logits(5, 37, torch.float32, device, g)
    teacher = make_logits(4, 37, torch.bfloat16, device, g)
    teacher[2, :9] = float("-inf")
    row_index = torch.tensor([3, -1, 0, 2, 2], device=device)
    direction = torch.randn(5, 37, generator=g, dtype=torch.float64).to(device)
    kwargs = dict(temperature=1.7, row_index=row_index, reduction=reduction)
    row_weights = torch.linspace(0.5, 2, 5, dtype=torch.float64, device=device)  # reduction="none": a weighted sum

    def scalar_loss(kl_fn):
        def loss(s, t, **kw):
            value = kl_fn(s, t, **kw)
            return value if reduction != "none" else (value * row_weights.to(value.dtype)).sum()
        return loss

    grad, second = _hessian_vector(scalar_loss(ops.temperature_kl), student, teacher, direction, **kwargs)
    ref_grad, ref_second = _hessian_vector(scalar_loss(reference.temperature_kl), student.double(), teacher,
                                           direction, **kwargs)
    assert rel_err(grad, ref_grad) < FP32_TOL
    assert ref_second.abs().max() > 1e-3  # the old silent answer (0) cannot pass
    assert rel_err(second, ref_second) < 1e-4
    assert torch.all(second[1] == 0)  # the ignored row


@pytest.mark.filterwarnings("ignore:Input #. requires gradient and is not a double precision")
def test_gradgradcheck():
    """torch.autograd.gradgradcheck on the op (fp32: finite differences with a larger eps and tolerance), and the
    same check on the fp64 reference it is compared with above."""
    g = torch.Generator().manual_seed(32)
    student = make_logits(3, 6, torch.float32, "cpu", g, spread=1.0).requires_grad_(True)
    teacher = make_logits(3, 6, torch.float32, "cpu", g, spread=1.0)
    row_index = torch.tensor([2, 0, -1])
    fn = lambda s: ops.temperature_kl(s, teacher, temperature=1.5, row_index=row_index, reduction="sum")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (student,), eps=1e-2, atol=2e-3, rtol=2e-2)
    ref_fn = lambda s: reference.temperature_kl(s, teacher, temperature=1.5, row_index=row_index,  # noqa: E731
                                                reduction="sum")
    assert torch.autograd.gradgradcheck(ref_fn, (student.detach().double().requires_grad_(True),))


def test_stored_gradient_output_is_not_differentiable():
    """The op's second output is a constant of the forward: no gradient may silently flow (as 0) through it."""
    student = torch.randn(2, 5, requires_grad=True)
    _, grad = torch.ops.epic_ext.temperature_kl(student, torch.randn(2, 5), None, 1.0, 1.0, True)
    assert not grad.requires_grad


# ------------------------------------------------------------------------------- issue 10: tiny temperatures --
@pytest.mark.parametrize("temperature", [1e-39, 4e-39, 1e-45])
def test_temperature_too_small_to_compute_is_rejected(temperature):
    """1e-39 used to pass the check and return NaN (reference 2.56e-39)."""
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0 and >= 4.2"):
        ops.temperature_kl(student, teacher, temperature=temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [4.25e-39, 1e-38, 1e-30, 1e-20, 1e-3])
@pytest.mark.parametrize("kernels", ["default", "generic"])
def test_tiny_temperatures_are_computed(device, temperature, kernels, monkeypatch):
    """Logits / T overflow fp32 here; the kernels only scale differences to the row max, so the result is right."""
    if kernels == "generic":
        if device != "cpu":
            pytest.skip("EPIC_EXT_CPU_KERNELS selects CPU kernels only")
        monkeypatch.setenv("EPIC_EXT_CPU_KERNELS", "generic")
    g = torch.Generator().manual_seed(33)
    student = make_logits(6, 37, torch.float32, device, g)
    teacher = make_logits(6, 37, torch.float32, device, g)
    loss, grad = run_kernel(student, teacher, temperature=temperature, reduction="none")
    ref_loss, ref_grad = run_reference(student, teacher, temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all() and ref_loss.abs().max() > 0
    assert rel_err(loss, ref_loss) < 1e-5
    # scale / T = T: fp32 gradients near 1e-39 are subnormal, so compare them relative to T.
    assert (grad.double().cpu() - ref_grad.cpu()).abs().max().item() <= 1e-5 * temperature


def test_scale_over_temperature_must_fit_fp32():
    with pytest.raises(RuntimeError, match="scale / temperature must be finite in fp32"):
        ops.temperature_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=1e-10, scale=1e30)
    with pytest.raises(ValueError, match="temperature 1e\\+300 is too large"):
        ops.temperature_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=1e300)
    with pytest.raises(TypeError, match="temperature must be a number, got the bool"):
        ops.temperature_kl(torch.randn(2, 5), torch.randn(2, 5), temperature=True)


# ------------------------------------------------------------------- issue 10: non-finite logits, op == reference --
NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")
# (what to place, the expected loss of row 1): rows 0 and 2 stay finite.
SPECIAL_ROWS = {
    "teacher row all -inf": ("teacher", slice(None), NEG_INF, "nan"),
    "teacher NaN entry": ("teacher", 3, NAN, "nan"),
    "teacher +inf entry": ("teacher", 3, POS_INF, "nan"),
    "student NaN entry": ("student", 3, NAN, "nan"),
    "student +inf entry": ("student", 3, POS_INF, "nan"),
    "student row all -inf": ("student", slice(None), NEG_INF, "nan"),
    "student -inf under a live teacher entry": ("student", 3, NEG_INF, "inf"),
    "teacher -inf entries": ("teacher", slice(0, 20), NEG_INF, "finite"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(SPECIAL_ROWS))
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_non_finite_logits_op_and_reference_agree(device, case, student_dtype):
    """An all -inf teacher row and a NaN teacher entry used to give NaN from the op but 0 from the reference."""
    which, where, value, expected = SPECIAL_ROWS[case]
    g = torch.Generator().manual_seed(zlib_seed(case))
    student = make_logits(3, 41, student_dtype, device, g)
    teacher = make_logits(3, 41, torch.float32, device, g)
    (student if which == "student" else teacher)[1, where] = value
    loss, grad = run_kernel(student, teacher, reduction="none")
    ref_loss, ref_grad = run_reference(student, teacher, reduction="none")
    kind = {"nan": torch.isnan, "inf": torch.isposinf, "finite": torch.isfinite}[expected]
    assert kind(loss[1]) and kind(ref_loss[1]), (loss, ref_loss)
    assert torch.isfinite(loss[[0, 2]]).all()
    torch.testing.assert_close(loss.cpu(), ref_loss.float().cpu(), rtol=1e-4, atol=1e-5, equal_nan=True)
    if expected == "nan":
        assert torch.isnan(grad[1]).all() and torch.isnan(ref_grad[1]).all()
    if expected != "inf":  # the gradient of an infinite loss is not compared
        tol = 1e-5 if student_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(grad.double().cpu(), ref_grad.double().cpu(), rtol=tol, atol=tol, equal_nan=True)
    # Reductions: a NaN row makes mean and sum NaN; an infinite row makes them +inf.
    total = ops.temperature_kl(student, teacher, reduction="sum")
    ref_total = reference.temperature_kl(student, teacher, reduction="sum")
    assert torch.isnan(total) == torch.isnan(ref_total) and torch.isinf(total) == torch.isinf(ref_total)


def zlib_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows_are_zero_whatever_they_hold(device):
    """row_index -1: zero loss and an exactly zero gradient, in the op and the reference, even for NaN rows."""
    student = torch.randn(3, 9, device=device)
    teacher = torch.randn(2, 9, device=device)
    student[1] = float("nan")
    teacher[0] = float("nan")  # only row 1 would read it, and row 1 is ignored
    row_index = torch.tensor([1, -1, 1], device=device)
    for runner in (run_kernel, run_reference):
        loss, grad = runner(student, teacher, reduction="none", row_index=row_index)
        assert loss[1] == 0 and torch.all(grad[1] == 0) and torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_student_minus_inf_where_teacher_probability_underflows():
    """q = 0 < p is +inf even where p underflows fp32 (and fp64): the old kernel formed 0 * inf = NaN."""
    student = torch.tensor([[0.0, 1.0, float("-inf"), 0.5]])
    teacher = torch.tensor([[0.0, 1.0, -3000.0, 0.5]])
    assert torch.isposinf(ops.temperature_kl(student, teacher, reduction="none")).all()
    assert torch.isposinf(reference.temperature_kl(student, teacher, reduction="none")).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mean_of_rows_near_fp32_max_does_not_overflow(device):
    """Found by the fuzz suite: two rows of ~2.4e38 have a mean that fits fp32, but their fp32 sum was inf."""
    student = torch.tensor([[0.0, -1.0], [0.0, -1.0]], device=device)
    teacher = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]], device=device)
    kwargs = dict(temperature=4.25e-39, scale=1.0)
    loss = ops.temperature_kl(student, teacher, **kwargs)
    ref = reference.temperature_kl(student, teacher, **kwargs)
    assert 1e38 < ref.item() < 3.4e38 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=1e-5, atol=0)
    assert torch.isinf(ops.temperature_kl(student, teacher, reduction="sum", **kwargs))  # the sum does not fit
