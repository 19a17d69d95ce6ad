"""`python -m epic_ext.demo` (behind `make demo` until the training demo lands): a short showcase of the ops.

It prunes a LLaVA-shaped batch the FastV way (importance from the last prompt token, keep 128 of 576 visual
tokens, gather) and computes a distillation loss with the fused temperature KL, checking each result against
epic_ext.reference and timing both.
"""

from __future__ import annotations

import argparse
import time

import torch

import epic_ext
from epic_ext import ops, reference


def _timed(fn, repeats: int = 3):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = epic_ext.build_info()
    print(f"epic_ext {epic_ext.__version__} on {args.device}: {info}")
    if not epic_ext.extension_available():
        print("the compiled extension is missing; run `make build`")
        return 1
    g = torch.Generator().manual_seed(args.seed)
    device = args.device

    # A LLaVA-1.5-like prefill: 35 text tokens, 576 image tokens, 40 more text tokens; 32 heads of 128.
    batch, heads, head_dim, length, span_start, span = 4, 32, 128, 651, 35, 576
    query = torch.randn(batch, heads, 1, head_dim, generator=g).to(device)
    key = torch.randn(batch, heads, length, head_dim, generator=g).to(device)
    hidden = torch.randn(batch, length, 4096, generator=g).to(device)
    positions = torch.full((batch, 1), length - 1, device=device)
    starts = torch.full((batch,), span_start, device=device)

    def prune():
        importance = ops.attention_importance(query, key, query_positions=positions)
        keep_index = ops.select_tokens(importance, starts, span, 128)
        text = torch.cat([torch.arange(span_start), torch.arange(span_start + span, length)]).to(device)
        full_index = torch.cat([text[:span_start].expand(batch, -1), keep_index,
                                text[span_start:].expand(batch, -1)], dim=1)
        return keep_index, ops.gather_tokens(hidden, full_index, dim=1)

    def prune_reference():
        importance = reference.attention_importance(query, key, query_positions=positions)
        return reference.select_tokens(importance, starts, span, 128)

    (keep_index, pruned), ms_ours = _timed(prune)
    expected, ms_ref = _timed(prune_reference, repeats=1)
    print(f"\nFastV pruning of {batch} x {length} tokens at 128/576 visual tokens kept -> {pruned.shape[1]} tokens")
    print(f"  epic_ext importance+select+gather: {ms_ours:8.2f} ms   kept set equals fp64 reference: "
          f"{torch.equal(keep_index.cpu(), expected.cpu())}")
    print(f"  fp64 reference importance+select:  {ms_ref:8.2f} ms")

    n_rows, vocab = 512, 32000
    student = (torch.randn(n_rows, vocab, generator=g) * 3).to(device).requires_grad_(True)
    teacher = (torch.randn(n_rows, vocab, generator=g) * 3).to(device)
    row_index = torch.randperm(n_rows, generator=g).to(device)
    row_index[::7] = -1

    def fused():
        student.grad = None
        loss = ops.temperature_kl(student, teacher, temperature=2.0, row_index=row_index)
        loss.backward()
        return loss.detach(), student.grad

    def plain():
        student.grad = None
        loss = reference.temperature_kl(student, teacher, temperature=2.0, row_index=row_index,
                                        compute_dtype=torch.float32)
        loss.backward()
        return loss.detach(), student.grad

    (loss, grad), ms_fused = _timed(fused)
    (loss_ref, grad_ref), ms_plain = _timed(plain)
    print(f"\nTemperature KL (T=2) over {n_rows} x {vocab} logits, forward + backward")
    print(f"  epic_ext fused:      {ms_fused:8.2f} ms   loss {loss.item():.6f}")
    print(f"  torch eager (fp32):  {ms_plain:8.2f} ms   loss {loss_ref.item():.6f}   "
          f"max |grad diff| {(grad - grad_ref).abs().max().item():.2e}")
    print(f"  speed-up: {ms_plain / ms_fused:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
