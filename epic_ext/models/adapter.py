"""The family adapter interface: how one model family plugs into the pruning engine (engine.py), and the registry
`apply_compression` dispatches on. Adapters import this module, never the engine.

The adapter interface (`FamilyAdapter`; see llava.py for the smallest complete one)
---------------------------------------------------------------------------------
Class attributes:
    name: short family name for messages ("llava", "llava_next", ...).
    model_class_names: the transformers class names the adapter accepts (the top-level *ForConditionalGeneration
        and its *Model); `apply_compression` matches them against the model's class and its bases by name, so no
        transformers class is imported to dispatch.
Methods (all receive the top-level model or its parts; none may keep per-call state on the adapter, which is
shared by every handle):
    multimodal_module(model) -> nn.Module: the module whose forward receives `input_ids` / `inputs_embeds` before
        the visual features are merged in (LlavaModel, Qwen2_5_VLModel, ...). A forward pre-hook reads it.
    language_model(model) -> nn.Module: the text decoder whose `forward` is replaced (it has `.layers`, `.norm`,
        `.rotary_emb`, `.config`, `.embed_tokens`).
    visual_token_ids(config) -> tuple[int, ...]: the placeholder ids of every visual token (image, video, ...).
        All of them are "visual" for the compressors: ratio / keep apply per sample over their union.
    visual_mask(module, input_ids, inputs_embeds) -> [B, L] bool | None: True at visual tokens. The default uses
        `visual_token_ids` on the ids, else compares the embeddings with those tokens' embeddings.
    default_position_ids(batch, length, past_length, device) -> Tensor: the ids the stock text model builds when the
        caller passes none (1-D families: [1, L] = arange + past_length; M-RoPE families: [3|4, B, L]).
    normalize_position_ids(position_ids, batch) -> Tensor: the given ids in the family's canonical layout, whose
        last two dims are (batch or 1, sequence) and any leading dims are rows (M-RoPE: [3, B, L], or [4, B, L] with
        a leading text row). 1-D families return [B|1, L] unchanged.
    split_position_ids(position_ids) -> (rope_position_ids, text_position_ids): what the rotary embedding gets, and
        what create_causal_mask and the decoder layers get as `position_ids` (None allowed), as the stock forward
        splits them (Qwen: [4, B, L] -> ([3, B, L], row 0)).
    gather_position_ids(position_ids, kept) -> Tensor: the canonical ids of the kept rows; kept [B, L'] int64
        original positions, -1 = padding slot. The default expands the batch dim and gathers along the last dim
        (every leading row alike): kept tokens keep their original (1-D or 3-D) positions.
    begin_call(language_model, kwargs) -> CallExtras: pops family-specific language-model kwargs (e.g. Qwen3-VL's
        `deepstack_visual_embeds` / `visual_pos_masks`) before the rest reaches the decoder layers, and returns an
        object whose `after_layer(layer_idx, hidden_states)` re-applies them after each decoder layer and whose
        `prune(kept, visual_mask)` narrows them to the kept rows. The default pops nothing.
    multimodal_call(handle, module, args, kwargs) -> (args, kwargs) | None: called by the pre-hook of
        `multimodal_module` after the visual mask is read; may return changed call arguments (Qwen: decoding
        positions after a K = 0 prefill, see `CompressionHandle.unpruned_cache_length`). The default changes nothing.
Decoding positions: the engine never invents decode positions when the caller gives them (LLaVA's generate passes
attention-mask-based ids; Qwen's model adds `rope_deltas`). When none are given it uses `default_position_ids`
with past_length = the cache's unpruned length (layer 0 holds every token unless K = 0; at K = 0 the engine adds
the number of dropped tokens it recorded at prefill, see `CompressionHandle.unpruned_cache_length`), so new tokens
continue from the unpruned sequence's next position.
"""

from __future__ import annotations

import abc

import torch

from .. import ops

# ---------------------------------------------------------------------------------------------- the adapters --
class CallExtras:
    """Family-specific per-call state of the language-model forward (see FamilyAdapter.begin_call). The base class
    carries nothing."""

    def after_layer(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Called after decoder layer `layer_idx` with its output [B, L(') , D]; returns the hidden states to go on."""
        return hidden_states

    def prune(self, kept: torch.Tensor, visual_mask: torch.Tensor) -> None:
        """Called once when the sequence is pruned: kept [B, L'] original positions (-1 = padding slot),
        visual_mask [B, L] bool of the unpruned sequence."""


class FamilyAdapter(abc.ABC):
    """How one model family plugs into the engine (the interface is described in the module docstring)."""

    name: str = ""
    model_class_names: tuple[str, ...] = ()

    def multimodal_module(self, model) -> torch.nn.Module:
        """The module whose forward sees input_ids before visual features are merged in (pre-hooked). Default: the
        layout of every supported family, `*ForConditionalGeneration.model` holding `.language_model` (or the
        `*Model` class itself)."""
        inner = getattr(model, "model", None)
        return inner if inner is not None and hasattr(inner, "language_model") else model

    def language_model(self, model) -> torch.nn.Module:
        """The text decoder whose forward is replaced (default: the multimodal module's `language_model`)."""
        return getattr(self.multimodal_module(model), "language_model", None)

    @abc.abstractmethod
    def visual_token_ids(self, config) -> tuple[int, ...]:
        """Placeholder token ids of every visual token kind of the family (image, video)."""

    def visual_mask(self, module, input_ids: torch.Tensor | None,
                    inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """[B, L] bool, True at visual tokens; None when neither ids nor embeddings are given."""
        ids = self.visual_token_ids(module.config)
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        if inputs_embeds is None:
            return None
        tokens = torch.tensor(ids, device=inputs_embeds.device)
        visual_embeds = module.get_input_embeddings()(tokens).to(inputs_embeds.dtype)  # [T, D]
        return (inputs_embeds[:, :, None, :] == visual_embeds).all(dim=-1).any(dim=-1)

    def default_position_ids(self, batch: int, length: int, past_length: int, device) -> torch.Tensor:
        """1-D families: [1, L] int64, arange + past_length."""
        return (torch.arange(length, device=device) + past_length).unsqueeze(0)

    def normalize_position_ids(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """1-D families: [B|1, L] as given."""
        return position_ids

    def split_position_ids(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids for the rotary embedding, ids for masks and decoder layers); 1-D families: the same tensor twice."""
        return position_ids, position_ids

    def gather_position_ids(self, position_ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Canonical ids [..., B|1, L] -> [..., B, L'] at the kept original positions (-1 slots get 0; masked)."""
        batch, length = kept.shape[0], position_ids.shape[-1]
        rows = position_ids.shape[:-2]
        full = position_ids.expand(*rows, batch, length)
        if not rows:
            return ops.gather_tokens(full, kept, dim=1)
        flat = full.reshape(-1, batch, length).permute(1, 2, 0)  # [B, L, R]
        gathered = ops.gather_tokens(flat.contiguous(), kept, dim=1)  # [B, L', R]
        return gathered.permute(2, 0, 1).reshape(*rows, batch, kept.shape[1])

    def begin_call(self, language_model, kwargs: dict) -> CallExtras:
        """Pops family-specific language-model kwargs; the default has none."""
        return CallExtras()

    def multimodal_call(self, handle, module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Changed (args, kwargs) for the multimodal module's forward, or None (the default) to leave them."""
        return None


_ADAPTERS: list[FamilyAdapter] = []


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Makes apply_compression accept the adapter's model classes. Returns the adapter."""
    if not isinstance(adapter, FamilyAdapter) or not adapter.model_class_names:
        raise ValueError(f"register_adapter: expected a FamilyAdapter with model_class_names, got {adapter!r}")
    _ADAPTERS.append(adapter)
    return adapter


def supported_classes() -> list[str]:
    return [name for adapter in _ADAPTERS for name in adapter.model_class_names]


def adapter_for(model) -> FamilyAdapter:
    """The adapter of the model's class (or its nearest registered base class), by class name."""
    for cls in type(model).__mro__:
        for adapter in _ADAPTERS:
            if cls.__name__ in adapter.model_class_names:
                return adapter
    raise ValueError(f"apply_compression: expected a LLaVA model or another supported multimodal model, got "
                     f"{type(model).__name__}; supported classes: {', '.join(supported_classes())}")
