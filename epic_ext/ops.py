"""Public epic_ext ops: thin Python entry points over the compiled kernels (torch.ops.epic_ext.*).

Each op here has a CPU kernel and, in CUDA builds, a CUDA kernel registered under the same schema, a fake
(meta) implementation for torch.compile, and autograd where it applies. Training code calls these functions,
never ``torch.ops.epic_ext`` directly.
"""

from __future__ import annotations

import torch

from . import _EXTENSION_ERROR

__all__ = ["temperature_kl"]

_REDUCTIONS = ("mean", "sum", "none")


def _require_extension() -> None:
    if _EXTENSION_ERROR is not None:
        raise RuntimeError(f"epic_ext: {_EXTENSION_ERROR}")


def _check_tensor(value: object, name: str, op: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_same_device(op: str, first: tuple[str, torch.Tensor], *others: tuple[str, torch.Tensor | None]) -> None:
    name0, tensor0 = first
    for name, tensor in others:
        if tensor is not None and tensor.device != tensor0.device:
            raise RuntimeError(
                f"{op}: {name} is on {tensor.device} but {name0} is on {tensor0.device}; move both to the same device"
            )


# --------------------------------------------------------------------------------------------------------------
# temperature_kl
# --------------------------------------------------------------------------------------------------------------
def temperature_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    row_index: torch.Tensor | None = None,
    reduction: str = "mean",
    scale: float | None = None,
) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) per row, fused with the student gradient.

    kl_i = sum_v p_v (log p_v - log q_v) with p = softmax(teacher[r_i] / T), q = softmax(student[i] / T), in fp32
    whatever the input dtypes. The forward pass also computes d loss / d student (in the student's dtype, no
    [N, V] fp32 temporary); the backward pass only multiplies it by the incoming gradient.

    Args:
        student_logits: [N, V] fp32 / bf16 / fp16. Receives the gradient.
        teacher_logits: [M, V] fp32 / bf16 / fp16 (may differ from the student's dtype). A constant: no
            gradient flows to it. Entries of -inf have probability 0.
        temperature: T > 0.
        row_index: optional int64 [N]: student row i is compared with teacher row row_index[i]; -1 ignores the
            row (zero loss, zero gradient). None requires M == N and pairs row i with row i. On CUDA the range
            check costs one device synchronisation.
        reduction: "mean" (scale * sum_i kl_i / number of rows not ignored; 0.0 when every row is ignored),
            "sum" (scale * sum_i kl_i) or "none" (scale * kl_i, shape [N]).
        scale: factor on the loss, default T**2 (keeps gradient magnitudes independent of T).

    Returns:
        fp32 tensor: a scalar, or [N] for reduction="none".
    """
    op = "temperature_kl"
    _check_tensor(student_logits, "student_logits", op)
    _check_tensor(teacher_logits, "teacher_logits", op)
    if row_index is not None:
        _check_tensor(row_index, "row_index", op)
    _check_same_device(op, ("student_logits", student_logits), ("teacher_logits", teacher_logits),
                       ("row_index", row_index))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    scale = temperature * temperature if scale is None else float(scale)
    _require_extension()
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    row_loss, _ = torch.ops.epic_ext.temperature_kl(
        student_logits, teacher_logits, row_index, temperature, scale, compute_grad
    )
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if row_index is None:
        return total / max(student_logits.shape[0], 1)
    # Counted on the device: no host synchronisation.
    return total / (row_index >= 0).sum().clamp(min=1)


def _register_temperature_kl() -> None:
    @torch.library.register_fake("epic_ext::temperature_kl")
    def _temperature_kl_fake(student, teacher, row_index, temperature, scale, compute_grad):
        n_rows, vocab = student.shape
        row_loss = student.new_empty((n_rows,), dtype=torch.float32)
        grad = student.new_empty((n_rows, vocab)) if compute_grad else student.new_empty((0,))
        return row_loss, grad

    @torch.library.register_fake("epic_ext::temperature_kl_backward")
    def _temperature_kl_backward_fake(grad, grad_rows):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        _, _, _, _, _, compute_grad = inputs
        _, grad = output
        ctx.compute_grad = compute_grad
        ctx.save_for_backward(grad)

    def backward(ctx, grad_row_loss, _grad_of_grad):
        if not ctx.compute_grad:
            raise RuntimeError(
                "temperature_kl: backward through a call made with compute_grad=False; call "
                "epic_ext.ops.temperature_kl with a student that requires grad and grad mode enabled"
            )
        (grad,) = ctx.saved_tensors
        student_grad = torch.ops.epic_ext.temperature_kl_backward(grad, grad_row_loss.float())
        return student_grad, None, None, None, None, None

    torch.library.register_autograd("epic_ext::temperature_kl", backward, setup_context=setup_context)


if _EXTENSION_ERROR is None:
    _register_temperature_kl()
