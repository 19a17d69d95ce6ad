"""Generators of LLaVA-like token-ranking inputs for the token-op tests: a per-sample image span at an offset,
left or right padding, query rows at the last prompt positions."""

from __future__ import annotations

import torch


def make_batch(batch, q_heads, kv_heads, rows, length, head_dim, dtype, device, generator, padding="right",
               span=576, skip_rows=False):
    """Returns query, key, query_positions, key_padding_mask, span_start (all on device)."""
    query = torch.randn(batch, q_heads, rows, head_dim, generator=generator).to(dtype).to(device)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    key[:, :, :, : max(1, head_dim // 8)] *= 3  # a few strong directions: peaky, realistic attention
    key = key.to(dtype).to(device)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    positions = torch.full((batch, rows), -1, dtype=torch.long)
    span_start = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        real = int(torch.randint(max(span + rows + 2, length - 60), length + 1, (1,), generator=generator))
        first = length - real if padding == "left" else 0
        mask[b, first : first + real] = True
        text_before = int(torch.randint(1, max(2, real - span - rows), (1,), generator=generator))
        span_start[b] = first + text_before
        last = first + real - 1
        positions[b] = torch.arange(last - rows + 1, last + 1)
        if skip_rows and rows > 1:
            positions[b, torch.randint(0, rows, (1,), generator=generator)] = -1
    return query, key, positions.to(device), mask.to(device), span_start.to(device)
