"""Public epic_ext ops: thin Python entry points over the compiled kernels (torch.ops.epic_ext.*).

Each op here has a CPU kernel and, in CUDA builds, a CUDA kernel registered under the same schema, a fake
(meta) implementation for torch.compile, and autograd where it applies. Training code calls these functions,
never ``torch.ops.epic_ext`` directly.
"""

from __future__ import annotations

import math
import operator

import torch

from . import _EXTENSION_ERROR

__all__ = ["temperature_kl", "attention_importance", "select_tokens", "gather_tokens"]

_REDUCTIONS = ("mean", "sum", "none")


def _require_extension() -> None:
    if _EXTENSION_ERROR is not None:
        raise RuntimeError(f"epic_ext: {_EXTENSION_ERROR}")


def _check_tensor(value: object, name: str, op: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_int(value: object, name: str, op: str) -> int:
    """value as a Python int: ints, NumPy integers and one-element integer tensors pass; bool, float (4.7, and
    4.0 too), and anything outside int64 raise an error naming the argument instead of being truncated."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{op}: {name} must be an integer, got the bool {value!r}")
    if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex() or value.numel() != 1):
        raise TypeError(f"{op}: {name} must be an integer, got a {value.dtype} tensor of shape {tuple(value.shape)}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {type(value).__name__} {value!r}") from None
    if not _INT64_MIN <= result <= _INT64_MAX:
        raise ValueError(f"{op}: {name} must fit in int64, got {result}")
    return result


def _check_float(value: object, name: str, op: str) -> float:
    """value as a Python float; bools, strings and non-numbers raise an error naming the argument."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a number, got the bool {value!r}")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{op}: {name} must be a number, got the string {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__} {value!r}") from None


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

    Non-finite inputs (the reference, epic_ext.reference.temperature_kl, follows the same rules):
        - a NaN anywhere in a used teacher row or in the student row gives kl_i = NaN (and a NaN gradient row);
        - so does +inf in either row, and a teacher or student row that is entirely -inf (no distribution);
        - teacher -inf entries have p = 0 and add nothing; a student -inf where the teacher entry is not -inf
          gives kl_i = +inf (q = 0 < p);
        - ignored rows (row_index -1) are 0 with a zero gradient whatever they hold.
        A NaN row makes the "mean" and "sum" NaN, as in torch. temperature must be >= ~4.24e-39 (log2(e) / T must
        be finite in fp32; smaller values raise), and scale / T must be finite in fp32. Each row's loss is fp32 (a
        row beyond fp32's range is inf, and so is a reduction over it); "mean" and "sum" add the rows in fp64.

    Double backward (torch.autograd.grad(..., create_graph=True), then a gradient of that gradient) is supported:
    under create_graph the backward recomputes the gradient with differentiable torch ops in fp32 (one [N, V]
    temporary), so Hessian-vector products are exact. Only the student is differentiated, never the teacher.
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
    temperature = _check_float(temperature, "temperature", op)
    if not temperature > 0.0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if scale is None:
        scale = temperature * temperature
        if not math.isfinite(scale):
            raise ValueError(f"{op}: temperature {temperature} is too large: the default scale T**2 overflows")
    else:
        scale = _check_float(scale, "scale", op)
    _require_extension()
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    row_loss, _ = torch.ops.epic_ext.temperature_kl(
        student_logits, teacher_logits, row_index, temperature, scale, compute_grad
    )
    if reduction == "none":
        return row_loss
    # Summed in fp64: N fp32 row losses can overflow fp32 in the sum where their mean does not (found by the
    # fuzz suite: two rows of 3.2e38 gave a mean of inf).
    total = row_loss.sum(dtype=torch.float64)
    if reduction == "sum":
        return total.float()
    if row_index is None:
        return (total / max(student_logits.shape[0], 1)).float()
    # Counted on the device: no host synchronisation.
    return (total / (row_index >= 0).sum().clamp(min=1)).float()


def _student_grad_differentiable(student: torch.Tensor, teacher: torch.Tensor, row_index: torch.Tensor | None,
                                 temperature: float, scale: float, grad_rows: torch.Tensor) -> torch.Tensor:
    """grad_rows[i] * scale / T * (softmax(student[i] / T) - softmax(teacher[r_i] / T)) with torch ops, fp32,
    differentiable w.r.t. student and grad_rows; same non-finite rules as the kernels (NaN / +inf / all -inf rows
    give NaN rows, ignored rows give exact zeros, also in every higher derivative)."""
    s = student.float()
    t = teacher.detach().float()
    if row_index is None:
        used = torch.ones(s.shape[0], 1, dtype=torch.bool, device=s.device)
    else:
        used = (row_index >= 0)[:, None]
        t = t[row_index.clamp(min=0)]
    # Ignored rows are replaced before any math, so that their contents cannot reach a derivative as 0 * NaN.
    s = torch.where(used, s, torch.zeros((), dtype=s.dtype, device=s.device))
    t = torch.where(used, t, torch.zeros((), dtype=t.dtype, device=t.device))
    # Differences to the row max before dividing by T, as in the kernels (logit / T may overflow for tiny T);
    # a row max of +inf, -inf or NaN makes the row NaN.
    q = torch.softmax((s - s.detach().amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    p = torch.softmax((t - t.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    grad = (q - p) * (grad_rows[:, None] * (scale / temperature))
    return torch.where(used, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).to(student.dtype)


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
        student, teacher, row_index, temperature, scale, compute_grad = inputs
        _, grad = output
        ctx.compute_grad = compute_grad
        ctx.temperature = temperature
        ctx.scale = scale
        # The stored gradient is a constant of the forward, not a function of the student: marking it keeps a
        # gradient from silently flowing (as zero) through it.
        ctx.mark_non_differentiable(grad)
        # The inputs are saved only for create_graph backward passes (references, no copies).
        ctx.save_for_backward(grad, student, teacher, row_index)

    def backward(ctx, grad_row_loss, _grad_of_grad):
        if not ctx.compute_grad:
            raise RuntimeError(
                "temperature_kl: backward through a call made with compute_grad=False; call "
                "epic_ext.ops.temperature_kl with a student that requires grad and grad mode enabled"
            )
        grad, student, teacher, row_index = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the stored gradient is a constant, so its derivative w.r.t. the student would be
            # lost (a gradient of this gradient would silently be 0). Recompute it with differentiable ops.
            student_grad = _student_grad_differentiable(student, teacher, row_index, ctx.temperature, ctx.scale,
                                                        grad_row_loss.float())
        else:
            student_grad = torch.ops.epic_ext.temperature_kl_backward(grad, grad_row_loss.float())
        return student_grad, None, None, None, None, None

    torch.library.register_autograd("epic_ext::temperature_kl", backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------------------------
# Token ranking and pruning
# --------------------------------------------------------------------------------------------------------------
def attention_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None = None,
    query_positions: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FastV importance of every key: softmax(scale * q . k) averaged over query heads and valid query rows.

    Computed from q and k directly; the [B, H, R, L] attention matrix is never materialised (extra memory
    O(B * L)). Not differentiable (ranking is not trained through).

    Args:
        query: [B, Hq, R, D] post-RoPE query rows that do the looking (e.g. the last prompt token), fp32/bf16/fp16.
        key: [B, Hkv, L, D] post-RoPE keys, same dtype, not repeated for grouped-query attention (Hq % Hkv == 0;
            query head h reads kv head h // (Hq // Hkv)).
        scale: softmax scale, default D ** -0.5.
        query_positions: optional int64 [B, R], each row's position in the key sequence: keys after it are masked
            (causal). -1 skips the row. None: every row sees every key.
        key_padding_mask: optional bool [B, L], True = real token; padded keys get probability 0.

    Returns:
        [B, L] fp32. A row that sees no key is not counted; a sample without a counted row gets zeros.

    NaN and inf propagate as in epic_ext.reference.attention_importance (torch.softmax semantics): a counted row
    whose visible scores include a NaN or +inf (an fp32 score that overflows counts as inf), or are all -inf, has
    a NaN softmax, and the mean carries it to every position of that sample; never zeros or plausible numbers.
    Skipped rows, padded keys and keys after a row's position are not looked at. D must be > 0.
    """
    op = "attention_importance"
    _check_tensor(query, "query", op)
    _check_tensor(key, "key", op)
    _check_same_device(op, ("query", query), ("key", key), ("query_positions", query_positions),
                       ("key_padding_mask", key_padding_mask))
    _require_extension()
    return torch.ops.epic_ext.attention_importance(
        query, key, None if scale is None else _check_float(scale, "scale", op), query_positions, key_padding_mask
    )


def select_tokens(
    scores: torch.Tensor, span_start: torch.Tensor | int, span_length: int, keep: int
) -> torch.Tensor:
    """Per sample, the `keep` highest-scoring positions inside [span_start[b], span_start[b] + span_length).

    Args:
        scores: [B, L] float (e.g. attention_importance's output).
        span_start: int64 [B] (or one int for every sample): first position of each sample's span; every span
            must lie inside [0, L) (checked without overflow, so values near 2**63 are rejected too).
        span_length: positions in every span (an integer: floats and bools are errors, never truncated).
        keep: how many to keep, an integer with 0 <= keep <= span_length.

    Returns:
        int64 [B, keep] absolute positions in ascending order. Ties go to the lower position; NaN ranks lowest.
    """
    op = "select_tokens"
    _check_tensor(scores, "scores", op)
    if not isinstance(span_start, torch.Tensor):
        start = _check_int(span_start, "span_start", op)
        span_start = torch.full((scores.shape[0],), start, dtype=torch.long, device=scores.device)
    _check_tensor(span_start, "span_start", op)
    span_length = _check_int(span_length, "span_length", op)
    keep = _check_int(keep, "keep", op)
    _check_same_device(op, ("scores", scores), ("span_start", span_start))
    _require_extension()
    return torch.ops.epic_ext.select_tokens(scores, span_start, span_length, keep)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Select positions `index` along `dim` of x, per sample; index -1 yields a zero row (padding).

    Args:
        x: [B, ..., L, ...] with L at `dim` (>= 1), e.g. hidden states [B, L, D] (dim=1) or a KV cache
            [B, H, L, D] (dim=2). Any dtype; differentiable for floating dtypes.
        index: int64 [B, K], entries in [-1, L).
        dim: the sequence dimension of x.

    Returns:
        x's shape with K at `dim`. The backward scatters (accumulating repeated indices) into zeros.
    """
    op = "gather_tokens"
    _check_tensor(x, "x", op)
    _check_tensor(index, "index", op)
    dim = _check_int(dim, "dim", op)
    _check_same_device(op, ("x", x), ("index", index))
    _require_extension()
    return torch.ops.epic_ext.gather_tokens(x, index, dim)


def _register_token_ops() -> None:
    @torch.library.register_fake("epic_ext::attention_importance")
    def _attention_importance_fake(query, key, scale, query_positions, key_padding_mask):
        return query.new_empty((key.shape[0], key.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("epic_ext::select_tokens")
    def _select_tokens_fake(scores, span_start, span_length, keep):
        return span_start.new_empty((scores.shape[0], keep))

    @torch.library.register_fake("epic_ext::gather_tokens")
    def _gather_tokens_fake(x, index, dim):
        shape = list(x.shape)
        shape[dim if dim >= 0 else dim + x.dim()] = index.shape[1]
        return x.new_empty(shape)

    @torch.library.register_fake("epic_ext::gather_tokens_backward")
    def _gather_tokens_backward_fake(grad, index, dim, length):
        shape = list(grad.shape)
        shape[dim if dim >= 0 else dim + grad.dim()] = length
        return grad.new_empty(shape)

    def gather_setup_context(ctx, inputs, output):
        x, index, dim = inputs
        ctx.save_for_backward(index)
        ctx.dim = dim
        ctx.length = x.shape[dim]

    def gather_backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        grad_x = torch.ops.epic_ext.gather_tokens_backward(grad_out, index, ctx.dim, ctx.length)
        return grad_x, None, None

    torch.library.register_autograd("epic_ext::gather_tokens", gather_backward, setup_context=gather_setup_context)

    def gather_backward_setup_context(ctx, inputs, output):
        _, index, dim, _ = inputs
        ctx.save_for_backward(index)
        ctx.dim = dim

    def gather_backward_backward(ctx, grad_grad_x):  # the backward is linear: its own gradient is a gather
        (index,) = ctx.saved_tensors
        return torch.ops.epic_ext.gather_tokens(grad_grad_x, index, ctx.dim), None, None, None

    torch.library.register_autograd("epic_ext::gather_tokens_backward", gather_backward_backward,
                                    setup_context=gather_backward_setup_context)


if _EXTENSION_ERROR is None:
    _register_temperature_kl()
    _register_token_ops()
