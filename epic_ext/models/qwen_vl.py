"""Qwen2.5-VL and Qwen3-VL adapters: Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration and their
*Model classes (transformers 5.17 - 5.25; the transformers calling conventions used are in _hf.py's Qwen section).

- Pre-hooked module: the Qwen2_5_VLModel / Qwen3VLModel (`model.model`), which sees `input_ids` before the vision
  features are scattered into `inputs_embeds`. Visual tokens are `image_token_id` and `video_token_id`, one kind of
  "visual" for the compressors: ratio / keep count a sample's image and video tokens together, and the compressor's
  ranking alone decides how the budget falls between images and frames. vision_start / vision_end and Qwen3-VL's
  per-frame timestamp tokens are text and are never dropped.
- Positions are the M-RoPE ids the model computes (`get_rope_index`, from `mm_token_type_ids` and the grids) and
  hands the language model as [3, B, L] (t, h, w) or, from generate(), [4, B, L] with a leading 1-D text row. Kept
  tokens keep their three ids (the rotary embedding is recomputed from the gathered ids). The pruned layers get no
  text row: it only feeds packed-sequence detection (the mask builder without a 2-D mask, flash attention at batch
  1), which must not read the gaps of a pruned sequence as sequence boundaries.
- Decoding: generate() passes every step's ids (the prompt's last ids + 1 per step on every row: the unpruned length
  + rope_deltas); a hand-written cached loop without position_ids gets `cache.get_seq_length() + rope_deltas` from
  the model, and cache layer 0 holds every token for K >= 1. At K = 0 layer 0 is pruned too: the adapter then
  passes the model the ids it would compute without pruning (`multimodal_call`, from the engine's unpruned cache
  length). Either way new tokens continue from the unpruned sequence's next position.
- Qwen3-VL deepstack: the vision tower's intermediate features (one level per `deepstack_visual_indexes` entry) are
  added to the visual rows after decoder layers 0, 1, ... Levels added after layers < K act on the full sequence, as
  in the unpruned model (level K-1 included: layer K's input, which DART compares, carries it). At the pruning,
  `visual_pos_masks` is gathered with the kept rows and every level keeps the rows of the kept visual tokens, so the
  levels added after layers >= K reach exactly the kept tokens. The dropped tokens are hidden from layer K on in the
  unpruned reference, so what they would have received there cannot change any kept row.
- Qwen2.5-VL with sliding-window layers (`use_sliding_window=True`) is refused by the engine.
"""

from __future__ import annotations

import torch

from . import _hf
from .adapter import CallExtras, FamilyAdapter, register_adapter


class _QwenAdapter(FamilyAdapter):
    """Shared by both families: image + video placeholder ids, M-RoPE position ids."""

    # rows of the ids the stock text model builds from none / from 2-D ids (Qwen2.5-VL: 3, Qwen3-VL: 4)
    default_rows: int = 3

    def visual_token_ids(self, config) -> tuple[int, ...]:
        ids = (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
        return tuple(i for i in ids if i is not None)

    def default_position_ids(self, batch: int, length: int, past_length: int, device) -> torch.Tensor:
        """[3|4, B, L]: arange + past_length on every row, as the stock text model builds them."""
        ids = torch.arange(length, device=device) + past_length
        return ids.view(1, 1, -1).expand(self.default_rows, batch, length)

    def normalize_position_ids(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """[B|1, L] -> the same ids on every row (as the stock model expands them); [3|4, B|1, L] batch-expanded."""
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(self.default_rows, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4):
            raise ValueError(f"position_ids: expected [B, L], [3, B, L] or [4, B, L] for a {self.name} model, got "
                             f"{tuple(position_ids.shape)}")
        return position_ids.expand(-1, batch, -1)

    def split_position_ids(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _hf.qwen_split_position_ids(position_ids)

    def multimodal_call(self, handle, module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Decoding without position ids or attention mask after a K = 0 prefill: the model would add rope_deltas to
        `cache.get_seq_length()`, i.e. to layer 0's length, which a K = 0 pruning shortened; pass the ids the
        unpatched model computes instead (the unpruned length + rope_deltas). Otherwise the model's own ids are
        right (layer 0 holds every token for K >= 1; generate passes ids) and nothing changes."""
        cache = kwargs.get(_hf.cache_keyword())
        if cache is None or kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None:
            return None
        unpruned = handle.unpruned_cache_length(cache)
        rope_deltas = _hf.qwen_rope_deltas(module)
        if unpruned == _hf.cache_length(cache) or rope_deltas is None:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return None
        batch, length = tokens.shape[:2]
        deltas = rope_deltas.to(tokens.device).repeat_interleave(batch // rope_deltas.shape[0], dim=0)  # [B, 1]
        ids = torch.arange(length, device=tokens.device)[None] + unpruned + deltas  # [B, L]
        return args, {**kwargs, "position_ids": ids[None].expand(3, batch, length)}

    def gather_position_ids(self, position_ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The M-RoPE rows at the kept positions ([3, B, L']); the text row is dropped (see the module docstring)."""
        rope, _ = _hf.qwen_split_position_ids(position_ids)
        return super().gather_position_ids(rope, kept)


class Qwen2_5_VLAdapter(_QwenAdapter):
    """Qwen2.5-VL: images and videos (one contiguous span of T*H*W/4 tokens per video)."""

    name = "qwen2_5_vl"
    model_class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    default_rows = 3


class _Deepstack(CallExtras):
    """Qwen3-VL's deepstack injections for one language-model call; narrowed to the kept rows at the pruning."""

    def __init__(self, visual_pos_masks: torch.Tensor | None, levels: list[torch.Tensor] | None):
        if levels is not None and visual_pos_masks is None:
            raise ValueError("deepstack_visual_embeds given without visual_pos_masks")
        self.visual_pos_masks = visual_pos_masks  # [B, L] bool
        self.levels = levels  # one [n_visual, D] per level, rows in the row-major order of visual_pos_masks

    def after_layer(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.levels is None or layer_idx >= len(self.levels):
            return hidden_states
        return _hf.qwen_add_deepstack(hidden_states, self.visual_pos_masks, self.levels[layer_idx])

    def prune(self, kept: torch.Tensor, visual_mask: torch.Tensor) -> None:
        if self.levels is None:
            return
        masks = self.visual_pos_masks.to(kept.device)
        batch, length = masks.shape
        kept_flags = torch.zeros(batch, length + 1, dtype=torch.bool, device=kept.device)
        kept_flags.scatter_(1, torch.where(kept >= 0, kept, torch.full_like(kept, length)), True)
        rows = kept_flags[:, :length][masks]  # [n_visual]: is each level row a kept token
        self.levels = [level[rows.to(level.device)] for level in self.levels]
        self.visual_pos_masks = masks.gather(1, kept.clamp(min=0)) & (kept >= 0)


class Qwen3VLAdapter(_QwenAdapter):
    """Qwen3-VL: images and videos (one span per frame, separated by timestamp text), deepstack injections."""

    name = "qwen3_vl"
    model_class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    default_rows = 4

    def begin_call(self, language_model, kwargs: dict) -> CallExtras:
        return _Deepstack(*_hf.qwen_pop_deepstack(kwargs))


QWEN2_5_VL = register_adapter(Qwen2_5_VLAdapter())
QWEN3_VL = register_adapter(Qwen3VLAdapter())
