"""Pure-torch versions of every epic_ext op: the truth for tests and the baseline for benchmarks.

They favour clarity over speed and compute in fp64 by default. ``compute_dtype=None`` computes in the inputs'
own dtype instead, which is what "plain torch in that dtype" means in the tolerance rule of the tests.
"""

from __future__ import annotations

import torch

__all__ = ["temperature_kl"]


def temperature_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    row_index: torch.Tensor | None = None,
    reduction: str = "mean",
    scale: float | None = None,
    compute_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Reference for :func:`epic_ext.ops.temperature_kl` (same arguments), differentiable by autograd.

    Args:
        student_logits: [N, V] float.
        teacher_logits: [M, V] float; treated as a constant (detached).
        compute_dtype: dtype of the math; ``None`` keeps the student's dtype.

    Returns:
        Loss in ``compute_dtype`` (or the student's dtype): a scalar, or [N] for ``reduction="none"``.
    """
    dtype = compute_dtype or student_logits.dtype
    student = student_logits.to(dtype) / temperature
    teacher = teacher_logits.detach().to(dtype) / temperature
    n_rows = student.shape[0]
    if row_index is None:
        valid = torch.ones(n_rows, dtype=torch.bool, device=student.device)
    else:
        valid = row_index >= 0
        teacher = teacher[row_index.clamp(min=0)]
    log_q = torch.log_softmax(student, dim=-1)
    log_p = torch.log_softmax(teacher, dim=-1)
    p = log_p.exp()
    # p == 0 (teacher -inf) contributes 0; the where also keeps 0 * -inf from becoming NaN.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    kl = torch.where(valid, terms.sum(dim=-1), torch.zeros((), dtype=dtype, device=student.device))
    scale = temperature**2 if scale is None else scale
    kl = kl * scale
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
