"""FastV: keep the visual tokens that receive the most attention at layer K-1 (Chen et al., ECCV 2024)."""

from __future__ import annotations

import torch

from .base import Compressor, LayerContext, select_by_score


class FastV(Compressor):
    """Rank by attention_importance from the query rows (the last prompt token; `query="prompt"` uses every prompt
    text token as a row). The importance is computed inside layer K-1's attention call from its post-RoPE q and k,
    with the model's own attention kernel (SDPA / flash) left to do the real work."""

    name = "fastv"
    needs_importance = True

    def __init__(self, query: str = "last"):
        if query not in ("last", "prompt"):
            raise ValueError(f"fastv: query must be 'last' or 'prompt', got {query!r}")
        self.query = query

    def select(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.importance is None:
            raise RuntimeError("fastv: layer K-1 did not report attention importance")
        return select_by_score(ctx, ctx.importance)
