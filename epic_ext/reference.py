"""Pure-torch versions of every epic_ext op: the truth for tests and the baseline for benchmarks.

They favour clarity over speed and compute in fp64 by default. ``compute_dtype=None`` computes in the inputs'
own dtype instead, which is what "plain torch in that dtype" means in the tolerance rule of the tests.
"""

from __future__ import annotations

import torch

__all__ = ["temperature_kl", "attention_importance", "select_tokens", "gather_tokens"]


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

    Non-finite inputs, the rules the op follows too: a NaN or +inf in a used teacher row or in the student row, or
    a row that is entirely -inf, gives NaN for that row; teacher -inf entries (p = 0) add nothing; a student -inf
    where the teacher entry is not -inf gives +inf (q = 0 < p); ignored rows are 0 with a zero gradient.
    """
    dtype = compute_dtype or student_logits.dtype
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    n_rows = student.shape[0]
    if row_index is None:
        valid = torch.ones(n_rows, dtype=torch.bool, device=student.device)
    else:
        valid = row_index >= 0
        teacher = teacher[row_index.clamp(min=0)]
    zero = torch.zeros((), dtype=dtype, device=student.device)
    # Ignored rows are zeroed before any math: whatever they hold (NaN included) cannot reach the loss or, as
    # 0 * NaN, the gradient.
    student = torch.where(valid[:, None], student, zero) / temperature
    teacher = torch.where(valid[:, None], teacher, zero) / temperature
    log_q = torch.log_softmax(student, dim=-1)
    log_p = torch.log_softmax(teacher, dim=-1)  # NaN everywhere in a row with NaN, +inf, or only -inf
    p = log_p.exp()
    # Teacher -inf (log p = -inf): p = 0 adds 0 (never 0 * -inf). Student -inf under a teacher entry that is not
    # -inf: +inf, also where p underflowed to 0. A NaN log p is neither, so NaN propagates.
    terms = torch.where(log_q == float("-inf"), torch.full_like(p, float("inf")), p * (log_p - log_q))
    terms = torch.where(log_p == float("-inf"), zero, terms)
    kl = torch.where(valid, terms.sum(dim=-1), zero)
    scale = temperature**2 if scale is None else scale
    kl = kl * scale
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def attention_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    query_positions: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference for :func:`epic_ext.ops.attention_importance`: the full [B, Hq, R, L] softmax, then means.

    Returns:
        [B, L] in compute_dtype. A counted row with a NaN or +inf visible score, or only -inf ones, has a NaN
        softmax (torch.softmax), which makes the whole sample NaN through the mean; the op does the same.
    """
    batch, q_heads, rows, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    q = query.to(compute_dtype)
    k = key.to(compute_dtype).repeat_interleave(q_heads // kv_heads, dim=1)  # [B, Hq, L, D]
    logits = scale * q @ k.transpose(-1, -2)  # [B, Hq, R, L]
    visible = torch.ones(batch, rows, length, dtype=torch.bool, device=query.device)
    row_used = torch.ones(batch, rows, dtype=torch.bool, device=query.device)
    if query_positions is not None:
        positions = torch.arange(length, device=query.device)
        visible &= positions[None, None, :] <= query_positions[:, :, None]
        row_used &= query_positions >= 0
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, :]
    row_used &= visible.any(dim=-1)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(row_used[:, None, :, None], probs, torch.zeros((), dtype=compute_dtype, device=q.device))
    count = (row_used.sum(dim=1) * q_heads).to(compute_dtype)  # [B]
    total = probs.sum(dim=(1, 2))  # [B, L]
    return torch.where(count[:, None] > 0, total / count.clamp(min=1)[:, None], torch.zeros_like(total))


def select_tokens(scores: torch.Tensor, span_start: torch.Tensor, span_length: int, keep: int) -> torch.Tensor:
    """Reference for :func:`epic_ext.ops.select_tokens` by three stable sorts (position, score, NaN-ness).

    Returns:
        int64 [B, keep], ascending.
    """
    result = []
    for b in range(scores.shape[0]):
        start = int(span_start[b])
        span = scores[b, start : start + span_length].double()
        positions = torch.arange(start, start + span_length, device=scores.device)
        is_nan = torch.isnan(span)
        value = torch.where(is_nan, torch.full_like(span, float("-inf")), span)
        order = torch.sort(-value, stable=True).indices  # positions already ascending: ties stay in position order
        order = order[torch.sort(is_nan[order].to(torch.int8), stable=True).indices]  # NaN last
        result.append(torch.sort(positions[order[:keep]]).values)
    if not result:
        return torch.empty(0, keep, dtype=torch.long, device=scores.device)
    return torch.stack(result)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Reference for :func:`epic_ext.ops.gather_tokens` with torch.gather on an expanded index (differentiable)."""
    dim = dim if dim >= 0 else dim + x.dim()
    zero_shape = list(x.shape)
    zero_shape[dim] = 1
    padded = torch.cat([x, x.new_zeros(zero_shape)], dim=dim)  # row L is the zero row (also when L = 0)
    safe = torch.where(index >= 0, index, torch.full_like(index, x.shape[dim]))
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = index.shape[1]
    expanded_shape = list(x.shape)
    expanded_shape[dim] = index.shape[1]
    return torch.gather(padded, dim, safe.view(shape).expand(expanded_shape))
