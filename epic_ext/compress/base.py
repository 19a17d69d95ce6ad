"""The compressor interface: what layer K-1 exposes, and how a compressor turns it into kept visual positions."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import ops


@dataclass
class LayerContext:
    """Everything a compressor may use, captured at decoder layer K-1 of one forward pass.

    Attributes:
        hidden_states: [B, L, D] output of layer K-1 (the input of layer K, where pruning happens).
        image_mask: [B, L] bool, True at visual tokens.
        attention_mask: [B, L] long/bool 2-D padding mask (1 = real token).
        query_positions: [B, R] int64 rows that "look" for FastV (the last prompt token by default); -1 = unused.
        prompt_mask: [B, L] bool, real text tokens of the prompt (before the first answer token), for DART's text
            pivots. Answer and pad tokens are never in it.
        keep: [B] int64 visual tokens to keep per sample (0 for text-only samples).
        keep_counts: the same on the host (list of B ints).
        max_keep: int, max(keep_counts) (sizes the result without another sync).
        spans: for each sample, its image spans as (start, length) pairs (host lists).
        importance: [B, L] fp32 FastV importance, filled when the compressor asked for it (needs_importance).
        key: [B, Hkv, L, D] post-RoPE keys of layer K-1, filled when asked for (needs_key).
        final_norm: the language model's final norm module (hidden [B, L, D] -> [B, L, D]); DART compares
            tokens on final_norm(hidden_states), as its release does.
        generator: optional torch.Generator for random choices.
    """

    hidden_states: torch.Tensor
    image_mask: torch.Tensor
    attention_mask: torch.Tensor
    query_positions: torch.Tensor
    prompt_mask: torch.Tensor
    keep: torch.Tensor
    keep_counts: list[int]
    max_keep: int
    spans: list[list[tuple[int, int]]]
    importance: torch.Tensor | None = None
    key: torch.Tensor | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    extras: dict = field(default_factory=dict)

    def uniform_span(self) -> tuple[int, int] | None:
        """(span_length, keep) when every sample has exactly one image span of one length and keeps the same count,
        which lets select_tokens run as one fused call; None otherwise."""
        if not self.spans or any(len(s) != 1 for s in self.spans):
            return None
        lengths = {s[0][1] for s in self.spans}
        if len(lengths) != 1 or len(set(self.keep_counts)) != 1:
            return None
        return lengths.pop(), self.max_keep


class Compressor(abc.ABC):
    """Ranks visual tokens. Subclasses set the class attributes and implement select() (a subclass without it
    cannot be instantiated)."""

    name: str = ""
    needs_importance: bool = False  # FastV-style attention scores from layer K-1's query rows
    needs_key: bool = False  # layer K-1's post-RoPE keys
    min_layer: int = 0  # the first layer K it can prune at (at K = 0 scoring reads layer 0's own attention)

    @abc.abstractmethod
    def select(self, ctx: LayerContext) -> torch.Tensor:
        """Returns int64 [B, max_keep]: kept visual positions per sample, ascending, -1 padded at the end."""

    def importance_from_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                                  query_positions: torch.Tensor,
                                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Importance [B, L] fp32 from layer K-1's post-RoPE query [B, Hq, L, D] and key [B, Hkv, L, D], for
        compressors with needs_importance: softmax mean over heads and the rows at query_positions [B, R]; keys
        where key_padding_mask [B, L] is False (padding) get probability 0, as in the model's own attention."""
        rows = ops.gather_tokens(query, query_positions, dim=2)  # [B, Hq, R, D]
        return ops.attention_importance(rows, key, scale=scaling, query_positions=query_positions,
                                        key_padding_mask=key_padding_mask)


def select_by_score(ctx: LayerContext, scores: torch.Tensor) -> torch.Tensor:
    """The ctx.keep[b] highest `scores` among each sample's visual tokens; ties to the lower position.

    Uses the fused select_tokens op when every sample has one image span of the same length (LLaVA-1.5); otherwise
    a batched sort over the whole sequence (several images, mixed batches), still without per-sample host syncs.

    Returns:
        int64 [B, ctx.max_keep], ascending positions, -1 padded at the end.
    """
    batch, length = scores.shape
    uniform = ctx.uniform_span()
    if uniform is not None:
        span_length, keep = uniform
        start = torch.tensor([s[0][0] for s in ctx.spans], dtype=torch.long, device=scores.device)
        return ops.select_tokens(scores, start, span_length, keep)
    positions = torch.arange(length, device=scores.device).expand(batch, length)
    value = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores.float())
    order = torch.sort(-value, dim=1, stable=True).indices  # score descending, ties by position
    # class 0: visual token with a number, 1: visual NaN, 2: not a candidate; stable: keeps the order above
    klass = torch.where(ctx.image_mask, torch.isnan(scores).long(), torch.full_like(positions, 2))
    order = order.gather(1, torch.sort(klass.gather(1, order), dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank of each position
    chosen = rank < ctx.keep[:, None]
    # ascending chosen positions first, the rest pushed past the end, then cut to max_keep
    ranked = torch.where(chosen, positions, positions + length).sort(dim=1).values[:, : ctx.max_keep]
    return torch.where(ranked < length, ranked, torch.full_like(ranked, -1))
