"""The FastV pipeline importance -> select -> gather under torch.compile(fullgraph=True), forward and backward."""

from __future__ import annotations

import torch

from epic_ext import ops
from helpers.token_data import make_batch


def prune(hidden, query, key, positions, mask, span_start):
    importance = ops.attention_importance(query, key, query_positions=positions, key_padding_mask=mask)
    keep_index = ops.select_tokens(importance, span_start, 48, 12)
    return ops.gather_tokens(hidden, keep_index, dim=1) * 2.0


def test_compiled_pipeline_matches_eager():
    g = torch.Generator().manual_seed(0)
    query, key, positions, mask, span_start = make_batch(2, 4, 2, 1, 80, 16, torch.float32, "cpu", g, span=48)
    hidden = torch.randn(2, 80, 24, generator=g, requires_grad=True)
    compiled = torch.compile(prune, fullgraph=True, backend="aot_eager")
    got = compiled(hidden, query, key, positions, mask, span_start)
    got.square().sum().backward()
    grad_compiled = hidden.grad.clone()
    hidden.grad = None
    expected = prune(hidden, query, key, positions, mask, span_start)
    expected.square().sum().backward()
    assert torch.equal(got, expected)
    assert torch.equal(grad_compiled, hidden.grad)
    assert (grad_compiled.abs().sum(dim=-1) > 0).sum() == 2 * 12
