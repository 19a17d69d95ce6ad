"""Random: a uniform choice of the visual tokens to keep (the baseline every ranking must beat)."""

from __future__ import annotations

import torch

from .base import Compressor, LayerContext, select_by_score


class RandomCompressor(Compressor):
    """Uniformly random subset of each sample's visual tokens, from the caller's torch.Generator when given
    (apply_compression(..., generator=g)), so that runs are reproducible."""

    name = "random"

    def __init__(self, generator: torch.Generator | None = None):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"random: generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def select(self, ctx: LayerContext) -> torch.Tensor:
        shape = ctx.image_mask.shape
        generator = self.generator or ctx.generator
        device = generator.device if generator is not None else ctx.image_mask.device
        scores = torch.rand(shape, generator=generator, device=device).to(ctx.image_mask.device)
        return select_by_score(ctx, scores)
