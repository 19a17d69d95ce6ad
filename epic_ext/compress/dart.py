"""DART: duplication-aware token reduction (Wen et al., 2025): keep the visual tokens least similar to a few pivots.

Pivots are the visual tokens with the largest L1 norm of their layer K-1 keys, plus prompt text tokens (never
answer or pad tokens) chosen the same way. Then a greedy loop adds, one at a time, the visual token whose highest
cosine similarity to everything chosen so far is lowest (ties to the lower position), until each sample has its
`keep`. Everything is batched on the device; the loop runs max(keep) steps with no host synchronisation.
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
        batch, length = ctx.image_mask.shape
        device = ctx.image_mask.device
        features = ctx.key.transpose(1, 2).reshape(batch, length, -1).float()  # [B, L, Hkv * D]
        norms = features.abs().sum(-1)  # [B, L] L1 norm of each token's keys
        unit = torch.nn.functional.normalize(features, dim=-1)
        positions = torch.arange(length, device=device).expand(batch, length)
        neg_inf = torch.tensor(float("-inf"), device=device)

        def top_by_norm(candidates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            """[B, count] positions of the largest norms among candidates (ties to lower position) and validity."""
            value = torch.where(candidates, norms, neg_inf)
            order = torch.sort(-value, dim=1, stable=True).indices[:, :count]
            return order, candidates.gather(1, order)

        keep = ctx.keep  # [B]
        n_image_pivots = min(self.image_pivots, length)
        image_pivots, image_valid = top_by_norm(ctx.image_mask, n_image_pivots)
        # a sample keeping fewer tokens than there are pivots keeps only its first `keep` pivots
        image_valid &= torch.arange(n_image_pivots, device=device)[None, :] < keep[:, None]
        chosen = torch.zeros(batch, length, dtype=torch.bool, device=device)
        chosen.scatter_(1, image_pivots, image_valid)
        # highest similarity of every token to the chosen set (pivots of both kinds)
        similarity = torch.full((batch, length), float("-inf"), device=device)
        pivot_sets = [(image_pivots, image_valid)]
        if self.text_pivots > 0:
            pivot_sets.append(top_by_norm(ctx.prompt_mask & ~ctx.image_mask, min(self.text_pivots, length)))
        for pivots, valid in pivot_sets:
            sims = torch.einsum("bpd,bld->bpl", unit.gather(1, pivots[..., None].expand(-1, -1, unit.shape[-1])), unit)
            sims = torch.where(valid[..., None], sims, neg_inf)
            similarity = torch.maximum(similarity, sims.max(dim=1).values)
        count = chosen.sum(1)
        for _ in range(ctx.max_keep):  # an upper bound: samples that are done stop changing
            open_slots = ctx.image_mask & ~chosen
            candidate = torch.where(open_slots, similarity, torch.full_like(similarity, float("inf")))
            pick = candidate.argmin(dim=1)  # first minimum: ties go to the lower position
            active = (count < keep) & open_slots.gather(1, pick[:, None]).squeeze(1)
            chosen.scatter_(1, pick[:, None], active[:, None] | chosen.gather(1, pick[:, None]))
            new_sim = torch.einsum("bd,bld->bl", unit[torch.arange(batch, device=device), pick], unit)
            similarity = torch.where(active[:, None], torch.maximum(similarity, new_sim), similarity)
            count = count + active.long()
        ranked = torch.where(chosen, positions, positions + length).sort(dim=1).values[:, : ctx.max_keep]
        return torch.where(ranked < length, ranked, torch.full_like(ranked, -1))
