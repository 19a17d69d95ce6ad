"""A pure-torch stand-in for the flash-attn package, so the CPU tests run transformers' own flash_attention_2 path
(its masks, unpadding, packed-sequence guess, kernel lookup by config name) and the pruning engine's handling of it.

Only the kernels are replaced: `flash_attn_func` / `flash_attn_varlen_func` with the flash-attn 2 conventions
(q [B, Lq, H, D] / [total_q, H, D], keys with fewer heads for GQA, causal aligned to the bottom right when the query
is shorter than the key, as flash-attn >= 2.1 does). The model is switched by writing its text config's attention
name directly: transformers' setter refuses flash_attention_2 without the package and a GPU.
"""

from __future__ import annotations

import contextlib

import torch


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None,
            causal: bool) -> torch.Tensor:
    """One sequence: q [Lq, H, D], k / v [Lk, Hk, D] -> [Lq, H, D], fp32 softmax."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    assert dropout_p == 0.0
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    assert dropout_p == 0.0
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        (q0, q1), (k0, k1) = (starts_q[i], starts_q[i + 1]), (starts_k[i], starts_k[i + 1])
        out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal)
    return out


@contextlib.contextmanager
def flash_standin(monkeypatch):
    """Inside the block transformers' flash_attention_2 runs these kernels (its lazy import returns them)."""
    from transformers import modeling_flash_attention_utils as fa_utils

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        assert implementation == "flash_attention_2", f"flash kernels looked up as {implementation!r}"
        return flash_attn_func, flash_attn_varlen_func, None, fa_utils._pad_input, fa_utils._unpad_input

    with monkeypatch.context() as patch:
        patch.setattr(fa_utils, "_lazy_imports", lazy_imports)
        patch.setattr(fa_utils, "_loaded_implementation", None)
        yield


def use_flash(model) -> None:
    """Switches the language model of `model` to flash_attention_2 (see the module docstring)."""
    model.config.get_text_config()._attn_implementation_internal = "flash_attention_2"
