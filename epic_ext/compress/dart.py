"""DART: duplication-aware token reduction (Wen et al., "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More", 2025), as published and as used by EPIC.

1. Pivots. Image pivots: the `image_pivots` visual tokens with the largest L1 norm of their layer K-1 post-RoPE keys
   (all KV heads concatenated). Text pivots: the `text_pivots` text tokens of the prompt that follow the sample's
   first visual token, ranked by the same norm.
2. For each pivot in turn, the visual tokens not yet kept whose features are least cosine-similar to the pivot's
   are kept. The features are the output of layer K-1 passed through the language model's final norm (the
   release applies `norm` before comparing).
3. Kept: the image pivots and every pivot's picks. Text pivots are not visual tokens (text is never dropped).

Choices where the release leaves room or differs, made explicit:
- Pivots are processed in ascending position order (the release walks a Python set). The image pivots are not
  candidates for any pivot's picks.
- Exact budget: with P_img image pivots and P the sample's real pivot count, every pivot picks
  k = floor((keep - P_img) / P) tokens and the first (keep - P_img) mod P pivots (in position order) one more, so
  each sample keeps exactly `keep`. The release keeps P_img + P * int(budget / P) instead.
- keep < image_pivots: only the top `keep` image pivots (by key norm) are kept and nothing is picked.
- Text pivots come from the prompt only: non-visual, real (not pad) tokens up to the last prompt token, after the
  first visual token. The release takes every token after the image, so in training it also picks answer and pad
  tokens; like the release, the system prompt (and BOS) before the image is never a pivot. A sample with fewer
  such tokens than `text_pivots` (or none: an image at the end of the prompt) uses the ones it has, so P is its
  real count and its picks per pivot grow accordingly. With several images, text between them counts.
- Ties (equal norms, equal similarities) go to the lower position. Similarities are computed in fp32 (fp64 inputs
  stay fp64).
- Text-only samples (keep 0) keep nothing and cost nothing but masked arithmetic.
- At K = 0 (nothing has run yet) the keys are layer 0's own, from a dry attention call, and the features are
  norm(input embeddings).

Batched over samples with no host synchronisation: one loop of image_pivots + text_pivots iterations, each a
[B, L] similarity row and a stable sort; the per-sample budgets are tensors.
"""

from __future__ import annotations

import torch

from .base import Compressor, LayerContext


class DART(Compressor):
    name = "dart"
    needs_key = True

    def __init__(self, image_pivots: int = 4, text_pivots: int = 4):
        if image_pivots < 1 or text_pivots < 0:
            raise ValueError(
                f"dart: image_pivots must be >= 1 and text_pivots >= 0, got {image_pivots} and {text_pivots}")
        self.image_pivots = int(image_pivots)
        self.text_pivots = int(text_pivots)

    def select(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.key is None:
            raise RuntimeError("dart: layer K-1 did not report its keys")
        if ctx.final_norm is None:
            raise RuntimeError("dart: the context has no final_norm (the language model's norm) for its features")
        batch, length = ctx.image_mask.shape
        device = ctx.image_mask.device
        dtype = torch.promote_types(ctx.key.dtype, torch.float32)
        norms = ctx.key.transpose(1, 2).reshape(batch, length, -1).to(dtype).abs().sum(-1)  # [B, L] key L1 norms
        with torch.no_grad():
            features = ctx.final_norm(ctx.hidden_states.detach())  # [B, L, D] norm(layer K-1 output)
        unit = torch.nn.functional.normalize(features.to(dtype), dim=-1)
        positions = torch.arange(length, device=device).expand(batch, length)
        image = ctx.image_mask
        keep = ctx.keep  # [B]

        def top_by_norm(candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            """[B, count] positions of the largest norms among candidates (ties to lower position), and validity."""
            value = torch.where(candidates, norms, torch.full_like(norms, float("-inf")))
            order = torch.sort(value, dim=1, descending=True, stable=True).indices[:, :count]
            return order, candidates.gather(1, order)

        n_image = min(self.image_pivots, length)
        image_pivots, image_valid = top_by_norm(image, n_image)
        image_valid &= torch.arange(n_image, device=device)[None, :] < keep[:, None]  # keep < P_img: top `keep`
        kept = torch.zeros(batch, length, dtype=torch.bool, device=device)
        kept.scatter_(1, image_pivots, image_valid)
        pivots, valid = image_pivots, image_valid
        if self.text_pivots > 0:
            first_visual = torch.where(image, positions, torch.full_like(positions, length)).min(dim=1).values
            text = ctx.prompt_mask & ~image & (positions > first_visual[:, None])
            text_pivots, text_valid = top_by_norm(text, min(self.text_pivots, length))
            pivots, valid = torch.cat([pivots, text_pivots], 1), torch.cat([valid, text_valid], 1)
        # ascending position order, unused pivot slots last
        order = torch.where(valid, pivots, pivots + length).sort(dim=1).indices
        pivots, valid = pivots.gather(1, order), valid.gather(1, order)

        n_pivots = valid.sum(1)
        remaining = keep - image_valid.sum(1)  # >= 0; 0 when keep <= image_pivots
        per_pivot = remaining // n_pivots.clamp(min=1)
        extra = remaining - per_pivot * n_pivots.clamp(min=1)
        slot = torch.arange(pivots.shape[1], device=device)[None, :]
        budget = torch.where(valid, per_pivot[:, None] + (slot < extra[:, None]).long(), torch.zeros_like(slot))

        pivot_unit = unit.gather(1, pivots[..., None].expand(-1, -1, unit.shape[-1]))  # [B, P, D]
        similarity = torch.einsum("bpd,bld->bpl", pivot_unit, unit)  # [B, P, L]
        for j in range(pivots.shape[1]):  # a handful of pivots: the only loop, no host sync
            open_slots = image & ~kept
            score = torch.where(open_slots, similarity[:, j], torch.full_like(norms, float("inf")))
            ranked = torch.sort(score, dim=1, stable=True).indices  # least similar first, ties to lower position
            rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
            kept |= open_slots & (rank < budget[:, j: j + 1])
        chosen = torch.where(kept, positions, positions + length).sort(dim=1).values[:, : ctx.max_keep]
        return torch.where(chosen < length, chosen, torch.full_like(chosen, -1))
