"""The model-agnostic pruning engine: visual-token compression inside a Hugging Face multimodal LLM (transformers 5.x).

A family (LLaVA-1.5, LLaVA-NeXT, ...) is one small `FamilyAdapter` in its own module, registered with
`register_adapter`; `epic_ext.models.apply_compression` dispatches on the model's class to it. Everything else lives
here and is shared: the replaced language-model forward (the patched decoder loop), the scoring capture at layer K-1,
the pruning at layer K, the mask rebuilding, the pruned-cache bookkeeping for generate, `CompressionHandle` and the
validation of the settings. transformers internals are reached only through `_hf`.

How it hooks in (each choice answers a pitfall listed in shared/NOTES-transformers.md):
- Visual positions come from the input ids in a forward pre-hook on the adapter's `multimodal_module` (the module
  whose forward still sees `input_ids`; the language model only sees embeddings); with embeddings only, from comparing
  with the visual tokens' embeddings.
- The language model's `forward` is replaced on the instance (not the class, not the decoder layers, so gradient
  checkpointing and output capture keep working) by a loop equal to the stock text-model forward plus two steps: at
  layer K-1 the scoring hook, at layer K the pruning (K = 0: a dry call of layer 0's attention scores first).
- Scoring reads layer K-1's post-RoPE query and key inside the model's own attention call: the text model's
  attention implementation is set to a registered wrapper ("epic_ext_sdpa", ...) around the original one (SDPA,
  flash, eager), with the original's mask function registered under the new name; a keyword given only to layer
  K-1 tells the wrapper to report. No eager fallback, no output_attentions.
- Pruning gathers hidden states with epic_ext.ops.gather_tokens, keeps the original position ids (RoPE is
  recomputed from them; 1-D or multi-row M-RoPE ids alike) and rebuilds the causal mask for the shorter sequence
  from an explicit 2-D mask with `layer_idx=K` (an implicit mask would read the gapped positions as packed
  sequences).
- generate(): pruning happens at prefill; layers >= K keep a shorter KV cache and, on every decoding step, get a
  mask rebuilt from the pruned prefill mask plus the new tokens.

The adapter interface (`FamilyAdapter`) is described in adapter.py.

Adding a family: one module with a FamilyAdapter subclass (adapter.py) and `register_adapter(...)` at import, imported by
epic_ext/models/__init__.py; any new transformers touch point goes at the end of _hf.py in a section for the family.
The engine's per-call state lives on the CompressionHandle (one per patched model), never on the adapter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from dataclasses import dataclass

import torch

from .. import ops
from ..compress import Compressor, LayerContext, get_compressor
from . import _hf
from .adapter import CallExtras, FamilyAdapter, adapter_for

_logger = logging.getLogger(__name__)

CAPTURE_KWARG = "epic_ext_capture"


# ------------------------------------------------------------------------------------------------- attention --
def _wrapped_attention(original_name: str, eager_function):
    """The original attention function of the text model plus the scoring report at layer K-1."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        capture = kwargs.pop(CAPTURE_KWARG, None)
        if capture is not None:
            capture(query, key, kwargs.get("scaling"))
        original = eager_function if original_name == "eager" else _hf.attention_function(original_name)
        if "flash" in original_name:  # flash picks its kernels by the config's name: it must see its own
            with _hf.reporting_attention_implementation(module.config, original_name):
                return original(module, query, key, value, attention_mask, **kwargs)
        return original(module, query, key, value, attention_mask, **kwargs)

    return attention


def _install_attention(language_model, original_name: str) -> str:
    """Registers epic_ext_<original> (attention + mask function) and returns its name."""
    name = f"epic_ext_{original_name}"
    eager_function = None
    if original_name == "eager":
        eager_function = _hf.eager_attention_function(language_model.layers[0].self_attn)
    elif not _hf.has_attention_function(original_name):
        raise ValueError(f"apply_compression: unsupported attention implementation {original_name!r}")
    _hf.register_attention(name, _wrapped_attention(original_name, eager_function), mask_of=original_name)
    return name


# ------------------------------------------------------------------------------------------------------ state --
@dataclass
class _Settings:
    method: str
    layer: int
    ratio: float | None
    keep: int | None
    compressor: Compressor


@dataclass
class _CallInputs:
    """What the pre-hooks saw for the current top-level forward."""

    image_mask: torch.Tensor | None = None  # [B, L] bool, every visual token (image and video)
    labels: torch.Tensor | None = None  # [B, L], popped from the top-level call while pruning
    query_positions: torch.Tensor | None = None  # [B, R] explicit override


@dataclass
class _PrunedCache:
    """What a pruned prefill leaves for the decoding steps of the same cache."""

    mask: torch.Tensor  # [B, L'(+t)] 2-D mask of the layers >= K, grown by one column per decoded token
    dropped: int  # tokens missing from cache layer 0 (K = 0 only): added to its length to get original positions


class CompressionHandle:
    """Returned by apply_compression. Holds the patch; `override()` changes it for a block, `remove()` undoes it.

    Attributes:
        adapter: the FamilyAdapter of the model's family.
        language_model: the patched text decoder.
        last_kept_positions: [B, L'] int64 original position of every row the last patched forward returned (text
            and visual, ascending, -1 for padding slots at the left of shorter samples; all positions when that
            forward did not prune; the new tokens' positions on a decoding step).
    """

    def __init__(self, model, adapter: FamilyAdapter, settings: _Settings):
        self.model = model
        self.adapter = adapter
        self.settings = settings
        self._multimodal = adapter.multimodal_module(model)
        self.language_model = adapter.language_model(model)
        self.config = model.config
        self._text_config = self.language_model.config
        self._inputs = _CallInputs()
        self._pruned_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last_kept_positions: torch.Tensor | None = None
        self._hooks = []
        self._generation_prompt_length: int | None = None  # set while model.generate runs
        self._removed = False
        self._original_attn = _hf.text_attention_implementation(self._text_config)
        ids = adapter.visual_token_ids(self.config)
        if not ids or any(i is None for i in ids):
            raise ValueError(f"apply_compression: the model config has no visual token ids ({adapter.name} "
                             "expects image_token_id): not a LLaVA-style model")

    # ---- public ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def override(self, *, ratio: float | None = None, keep: int | None = None, layer: int | None = None,
                 query_positions: torch.Tensor | None = None):
        """Changes the compression for the forward passes inside the block (e.g. a teacher pass at a lower ratio).

        Args:
            ratio / keep: the new amount (give at most one; ratio=0 disables pruning).
            layer: the new compression layer K.
            query_positions: int64 [B, R] rows FastV ranks with, instead of the last prompt token.
        """
        self._check_live()
        old_settings, old_query = self.settings, self._inputs.query_positions
        new_ratio, new_keep = (old_settings.ratio, old_settings.keep) if ratio is None and keep is None else (ratio, keep)
        validate_amount(new_ratio, new_keep)
        new_layer = old_settings.layer if layer is None else layer
        validate_layer(new_layer, self._text_config.num_hidden_layers, old_settings.compressor)
        self.settings = _Settings(old_settings.method, new_layer, new_ratio, new_keep, old_settings.compressor)
        self._inputs.query_positions = query_positions
        try:
            yield self
        finally:
            self.settings, self._inputs.query_positions = old_settings, old_query

    def remove(self) -> None:
        """Restores the model exactly: hooks, the language model's forward, the attention implementation."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        _hf.remove_forward(self.language_model)
        self.model.__dict__.pop("generate", None)
        _hf.set_text_attention_implementation(self.model, self._text_config, self._original_attn)
        self.model.__dict__.pop("_epic_ext_handle", None)
        self._removed = True

    def unpruned_cache_length(self, cache) -> int:
        """The number of original positions a cache covers: its layer-0 length, plus the tokens a pruning at K = 0
        dropped from layer 0 too. A family whose model derives decoding positions from `cache.get_seq_length()`
        (Qwen's `rope_deltas` path without an attention mask) needs this after a K = 0 prefill."""
        pruned = self._pruned_caches.get(cache) if cache is not None else None
        return _hf.cache_length(cache) + (pruned.dropped if pruned is not None else 0)

    @property
    def ratio(self) -> float | None:
        return self.settings.ratio

    @property
    def layer(self) -> int:
        return self.settings.layer

    # ---- installation ---------------------------------------------------------------------------------------
    def _install(self) -> None:
        name = _install_attention(self.language_model, self._original_attn)
        _hf.set_text_attention_implementation(self.model, self._text_config, name)
        self._hooks.append(self._multimodal.register_forward_pre_hook(self._multimodal_pre_hook, with_kwargs=True))
        if self.model is not self._multimodal:
            self._hooks.append(self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._top_post_hook, with_kwargs=True))
        _hf.install_forward(self.language_model, _make_language_model_forward(self))
        if hasattr(self.model, "generate"):
            self.model.generate = self._wrap_generate(self.model.generate)
        self.model._epic_ext_handle = self

    def _wrap_generate(self, generate):
        """Records the prompt length while generate() runs: with use_cache=False every step is a full forward, and
        ranking with the prompt's last token (not the newest one) keeps what cached generation keeps."""

        @functools.wraps(generate)
        def wrapper(*args, **kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            previous = self._generation_prompt_length
            self._generation_prompt_length = int(input_ids.shape[1]) if torch.is_tensor(input_ids) else None
            try:
                return generate(*args, **kwargs)
            finally:
                self._generation_prompt_length = previous

        return wrapper

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this compression handle was removed; call apply_compression again")

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _active(self) -> bool:
        s = self.settings
        return not (s.ratio is not None and s.ratio == 0.0)

    def _top_pre_hook(self, module, args, kwargs):
        self._inputs.labels = None
        if not self._active() or kwargs.get("labels") is None:
            return None
        if len(args) > 1:
            raise TypeError("with compression applied, pass model inputs other than input_ids as keyword arguments")
        kwargs = dict(kwargs)
        self._inputs.labels = kwargs.pop("labels")  # the loss is computed on the pruned logits in the post-hook
        return args, kwargs

    def _top_post_hook(self, module, args, kwargs, output):
        labels, self._inputs.labels = self._inputs.labels, None
        if self.last_kept_positions is not None:
            output["kept_positions"] = self.last_kept_positions
        if labels is None:
            return output
        logits = output["logits"]
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]  # position i predicts token i + 1, in original positions
        if self.last_kept_positions is not None:
            kept = self.last_kept_positions
            targets = torch.where(kept >= 0, targets.gather(1, kept.clamp(min=0)), torch.full_like(kept, -100))
        if logits.shape[1] != targets.shape[1]:
            raise RuntimeError("epic_ext: logits do not cover every position (logits_to_keep) while labels are given")
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                 reduction="sum")
        count = kwargs.get("num_items_in_batch")
        if count is None:
            count = (targets != -100).sum()
        output["loss"] = loss / count.to(loss.device) if torch.is_tensor(count) else loss / count
        return output

    def _multimodal_pre_hook(self, module, args, kwargs):
        self.last_kept_positions = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._inputs.image_mask = self.adapter.visual_mask(module, input_ids, kwargs.get("inputs_embeds"))
        return self.adapter.multimodal_call(self, module, args, kwargs)


def validate_amount(ratio, keep) -> None:
    if ratio is None and keep is None:
        raise ValueError("apply_compression: give ratio (the fraction of visual tokens removed, 0 disables pruning) "
                         "or keep (visual tokens kept per sample)")
    if ratio is not None and keep is not None:
        raise ValueError("apply_compression: give ratio or keep, not both")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not (0.0 <= float(ratio) < 1.0)):
        raise ValueError(f"apply_compression: ratio must be a number in [0, 1) (the fraction of visual tokens "
                         f"removed), got {ratio!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise ValueError(f"apply_compression: keep must be an int >= 0 (visual tokens kept per sample), got {keep!r}")


def validate_layer(layer, num_layers: int, compressor: Compressor) -> None:
    if not isinstance(layer, int) or not (compressor.min_layer <= layer < num_layers):
        raise ValueError(
            f"apply_compression: layer must be an int in [{compressor.min_layer}, {num_layers - 1}] for method "
            f"{compressor.name!r} (the model has {num_layers} decoder layers), "
            f"got {layer!r}")


def _validate_text_model(language_model) -> None:
    """Sliding-window layers count their window in cache slots, not original positions: after pruning the window
    would cover other tokens than the unpruned model's, so they are refused rather than computed differently."""
    layer_types = getattr(language_model.config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise NotImplementedError(f"apply_compression: the language model has {', '.join(other)} layers "
                                  "(config.layer_types); only full-attention decoders are supported")


# ------------------------------------------------------------------------------------------ the forward pass --
def _keep_counts(settings: _Settings, image_counts: list[int]) -> list[int]:
    counts = []
    for n in image_counts:
        if n == 0:
            counts.append(0)
        elif settings.keep is not None:
            if settings.keep > n:
                raise ValueError(f"apply_compression: keep={settings.keep} is more than the {n} visual tokens of a "
                                 "sample in this batch")
            counts.append(settings.keep)
        else:
            counts.append(min(n, int(math.floor((1.0 - settings.ratio) * n + 0.5))))
    return counts


def _spans(row: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, flag in enumerate(row):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i - start))
            start = None
    if start is not None:
        spans.append((start, len(row) - start))
    return spans


class _Plan:
    """Decisions for one language-model call, made once before the layer loop."""

    def __init__(self, handle: CompressionHandle, batch: int, length: int, past_length: int,
                 attention_mask: torch.Tensor, device):
        self.prune = False
        image_mask = handle._inputs.image_mask
        if not handle._active() or past_length > 0 or image_mask is None or image_mask.shape != (batch, length):
            return
        rows = image_mask.tolist()  # the one host sync of a pruned forward
        image_counts = [sum(r) for r in rows]
        if not any(image_counts):
            return
        self.keep_counts = _keep_counts(handle.settings, image_counts)
        if self.keep_counts == image_counts:
            return  # nothing to drop: the unpatched computation, exactly
        self.prune = True
        self.layer = handle.settings.layer
        self.image_mask = image_mask
        self.spans = [_spans(r) for r in rows]
        self.image_counts = image_counts
        self.attention_mask = attention_mask
        self.device = device


def prompt_query_positions(attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1]: the last prompt token: the one before the first supervised label, else the last real token."""
    batch, length = attention_mask.shape
    positions = torch.arange(length, device=attention_mask.device).expand(batch, length)
    last_real = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    if labels is None:
        return last_real[:, None]
    supervised = labels[:, :length] != -100
    first_answer = torch.where(supervised, positions, torch.full_like(positions, length)).min(dim=1).values
    return torch.where(first_answer < length, first_answer - 1, last_real)[:, None]


def _prompt_mask(attention_mask: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    return attention_mask.bool() & (positions <= query_positions.max(dim=1, keepdim=True).values)


def _make_language_model_forward(handle: CompressionHandle):
    adapter = handle.adapter

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        cache = _hf.pop_incoming_cache(past_key_values, kwargs)
        extras = adapter.begin_call(self, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        _hf.require_dynamic_cache(cache)
        if use_cache and cache is None:
            cache = _hf.new_dynamic_cache(self.config)
        past_length = _hf.cache_length(cache)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        pruned_cache = handle._pruned_caches.get(cache) if cache is not None and past_length > 0 else None
        if position_ids is None:
            original_past = past_length + (pruned_cache.dropped if pruned_cache is not None else 0)
            position_ids = adapter.default_position_ids(batch, length, original_past, device)
        else:
            position_ids = adapter.normalize_position_ids(position_ids, batch)

        explicit_mask = attention_mask
        if explicit_mask is not None and explicit_mask.dim() != 2:
            explicit_mask = None  # a prepared 4-D mask: used as given, no pruning decisions read it
        full_mask_2d = (explicit_mask if explicit_mask is not None
                        else torch.ones(batch, past_length + length, dtype=torch.long, device=device))
        plan = _Plan(handle, batch, length, past_length, full_mask_2d[:, past_length:], device)
        handle._inputs.image_mask = None  # consumed: a later direct call must not reuse it
        decode_on_pruned = not plan.prune and pruned_cache is not None
        # Every patched forward reports the original position of each output row (no pruning: all of them).
        first_position = past_length + (pruned_cache.dropped if pruned_cache is not None else 0)
        handle.last_kept_positions = (torch.arange(length, device=device) + first_position).expand(batch, length)

        # An explicit 2-D mask whenever positions may be gapped (never let the packed-sequence guess run).
        # A prepared 4-D mask is used as given; with no mask and nothing pruned, None keeps the stock fast path.
        if attention_mask is not None and attention_mask.dim() != 2:
            mask_for_layers = attention_mask
        elif attention_mask is not None or plan.prune or decode_on_pruned:
            mask_for_layers = full_mask_2d
        else:
            mask_for_layers = None
        rope_ids, text_ids = adapter.split_position_ids(position_ids)
        causal_mask = _hf.create_causal_mask(self.config, inputs_embeds, mask_for_layers, cache, text_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, rope_ids)
        capture = _Capture(handle, plan) if plan.prune else None
        prune_layer = plan.layer if plan.prune else handle.settings.layer

        if capture is not None and prune_layer == 0 and capture.wants_attention:
            # K = 0: nothing has run yet, so score with layer 0's own attention on the unpruned sequence in a dry
            # call (output discarded; costs one extra attention layer).
            first = self.layers[0]
            with torch.no_grad():
                _hf.attention_call(first.self_attn, first.input_layernorm(hidden_states), attention_mask=causal_mask,
                                   position_embeddings=position_embeddings, position_ids=text_ids,
                                   **{CAPTURE_KWARG: capture})
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if plan.prune and layer_idx == prune_layer:
                hidden_states, position_ids, position_embeddings, causal_mask = _prune(
                    self, handle, plan, capture, hidden_states, position_ids, cache, extras)
                text_ids = adapter.split_position_ids(position_ids)[1]
            elif decode_on_pruned and layer_idx == prune_layer:
                new_columns = (explicit_mask[:, -length:] if explicit_mask is not None
                               else torch.ones(batch, length, dtype=pruned_cache.mask.dtype, device=device))
                pruned_cache.mask = torch.cat([pruned_cache.mask, new_columns.to(pruned_cache.mask.dtype)], dim=1)
                causal_mask = _hf.create_causal_mask(self.config, hidden_states, pruned_cache.mask, cache,
                                                     text_ids, layer_idx=layer_idx)
            layer_kwargs = kwargs
            if capture is not None and layer_idx == prune_layer - 1 and capture.wants_attention:
                layer_kwargs = {**kwargs, CAPTURE_KWARG: capture}
            # From the pruning on, the kept tokens' positions have gaps. The layers need no position ids (RoPE comes
            # from position_embeddings, the mask is built), and flash attention would read gapped ids of a batch
            # of one as packed sequences (transformers' _is_packed_sequence) and attend within each run only.
            pruned_here = (plan.prune or decode_on_pruned) and layer_idx >= prune_layer
            hidden_states = _hf.decoder_layer_call(decoder_layer, hidden_states, attention_mask=causal_mask,
                                                   position_embeddings=position_embeddings,
                                                   position_ids=None if pruned_here else text_ids,
                                                   cache=cache, use_cache=use_cache, **layer_kwargs)
            hidden_states = extras.after_layer(layer_idx, hidden_states)
        hidden_states = self.norm(hidden_states)
        return _hf.base_model_output(hidden_states, cache)

    return forward


class _Capture:
    """Called by the attention wrapper inside layer K-1 with its post-RoPE q and k. Pure: it overwrites the same
    values if gradient checkpointing recomputes the layer."""

    def __init__(self, handle: CompressionHandle, plan: _Plan):
        compressor = handle.settings.compressor
        self.wants_attention = compressor.needs_importance or compressor.needs_key
        self.compressor = compressor
        explicit = handle._inputs.query_positions
        prompt_mask = plan.attention_mask
        prompt_length = handle._generation_prompt_length
        if prompt_length is not None and prompt_mask.shape[1] > prompt_length:
            prompt_mask = prompt_mask[:, :prompt_length]  # generate(use_cache=False): rank as at the first step
        self.query_positions = (explicit.to(plan.device) if explicit is not None
                                else prompt_query_positions(prompt_mask, handle._inputs.labels))
        if compressor.name == "fastv" and getattr(compressor, "query", "last") == "prompt" and explicit is None:
            prompt = _prompt_mask(plan.attention_mask, self.query_positions) & ~plan.image_mask
            length = prompt.shape[1]
            positions = torch.arange(length, device=prompt.device).expand_as(prompt)
            rows = torch.where(prompt, positions, torch.full_like(positions, length)).sort(dim=1).values
            width = max(int(prompt.sum(dim=1).max()), 1)
            rows = rows[:, :width]
            self.query_positions = torch.where(rows < length, rows, torch.full_like(rows, -1))
        self.key_padding_mask = plan.attention_mask.bool()  # pad keys get no probability, as in the model
        self.importance = None
        self.key = None

    def __call__(self, query, key, scaling):
        with torch.no_grad():
            if self.compressor.needs_importance:
                self.importance = self.compressor.importance_from_attention(
                    query.detach(), key.detach(), scaling, self.query_positions, self.key_padding_mask)
            if self.compressor.needs_key:
                self.key = key.detach()


def _prune(lm, handle: CompressionHandle, plan: _Plan, capture: _Capture, hidden_states, position_ids, cache,
           extras: CallExtras):
    batch, length = hidden_states.shape[:2]
    device = hidden_states.device
    attention_mask = plan.attention_mask
    keep = torch.tensor(plan.keep_counts, dtype=torch.long, device=device)
    query_positions = capture.query_positions if capture is not None else prompt_query_positions(
        attention_mask, handle._inputs.labels)
    ctx = LayerContext(hidden_states=hidden_states, image_mask=plan.image_mask, attention_mask=attention_mask,
                       query_positions=query_positions, prompt_mask=_prompt_mask(attention_mask, query_positions),
                       keep=keep, keep_counts=plan.keep_counts, max_keep=max(plan.keep_counts), spans=plan.spans,
                       importance=capture.importance if capture else None, key=capture.key if capture else None,
                       final_norm=lm.norm)
    kept_visual = handle.settings.compressor.select(ctx)  # [B, max_keep], -1 padded
    # Kept sequence: every non-visual position plus the kept visual ones, ascending; shorter samples are padded
    # on the left, so the last slot is the last real token for left-padded (generation) batches.
    positions = torch.arange(length, device=device).expand(batch, length)
    # -1 entries scatter into a spare column that is cut off again
    target = torch.where(kept_visual >= 0, kept_visual, torch.full_like(kept_visual, length))
    keep_flags = torch.cat([~plan.image_mask, plan.image_mask.new_zeros(batch, 1)], dim=1)
    keep_flags = keep_flags.scatter(1, target, torch.ones_like(target, dtype=torch.bool))[:, :length]
    new_lengths = [length - n + k for n, k in zip(plan.image_counts, plan.keep_counts)]
    new_length = max(new_lengths)
    order = torch.where(keep_flags, positions, positions - length).sort(dim=1).values  # dropped first (negative)
    kept = order[:, length - new_length:]
    kept = torch.where(kept >= 0, kept, torch.full_like(kept, -1))  # [B, L'] original positions, -1 = padding slot

    hidden_states = ops.gather_tokens(hidden_states, kept, dim=1)
    new_position_ids = handle.adapter.gather_position_ids(position_ids, kept)
    new_mask = ops.gather_tokens(attention_mask.long(), kept, dim=1)  # padding slots: 0
    rope_ids, text_ids = handle.adapter.split_position_ids(new_position_ids)
    position_embeddings = lm.rotary_emb(hidden_states, rope_ids)
    causal_mask = _hf.create_causal_mask(lm.config, hidden_states, new_mask, cache, text_ids, layer_idx=plan.layer)
    extras.prune(kept, plan.image_mask)
    if cache is not None:
        handle._pruned_caches[cache] = _PrunedCache(mask=new_mask, dropped=length - new_length if plan.layer == 0
                                                    else 0)
    handle.last_kept_positions = kept
    return hidden_states, new_position_ids, position_embeddings, causal_mask


# ------------------------------------------------------------------------------------------------- entry point --
def compress_model(model, adapter: FamilyAdapter, method: str, layer: int, ratio: float | None, keep: int | None,
                   **method_kwargs) -> CompressionHandle:
    """apply_compression for a model whose adapter is known (see epic_ext.models.apply_compression)."""
    if getattr(model, "_epic_ext_handle", None) is not None:
        raise RuntimeError("apply_compression: this model is already patched; call handle.remove() first")
    language_model = adapter.language_model(model)
    if language_model is None or not hasattr(language_model, "layers"):
        raise ValueError(f"apply_compression: expected a {adapter.name} model with a language_model, got "
                         f"{type(model).__name__}")
    compressor = get_compressor(method, **method_kwargs)
    validate_amount(ratio, keep)
    validate_layer(layer, language_model.config.num_hidden_layers, compressor)
    _validate_text_model(language_model)
    _hf.check_version()
    handle = CompressionHandle(model, adapter, _Settings(method, layer, ratio, keep, compressor))
    handle._install()
    return handle


def apply_compression(model, method: str = "fastv", layer: int = 2, ratio: float | None = None,
                      keep: int | None = None, **method_kwargs) -> CompressionHandle:
    """Prunes visual tokens inside a supported multimodal model at decoder layer `layer` of its language model.

    Args:
        model: a transformers model of a supported family (`supported_classes()`: LlavaForConditionalGeneration,
            LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
            Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration and their *Model classes),
            transformers 5.x.
        method: "fastv", "dart", "random" or a name registered with epic_ext.compress.register_compressor.
        layer: K, the decoder layer whose input is pruned. Scoring methods read layer K-1's attention; at K = 0
            they read layer 0's own attention on the unpruned sequence (one extra attention call).
        ratio: fraction of each sample's visual tokens (images and video frames together) removed, in [0, 1)
            (576 -> 128 kept is 0.778); 0 disables pruning (the unpatched computation, exactly).
        keep: alternatively, the number of visual tokens kept per sample, over all its images and frames. Exactly
            one of ratio / keep is required.
        **method_kwargs: passed to the compressor (e.g. query="prompt" for FastV, image_pivots=8 for DART,
            generator=torch.Generator() for Random).

    Returns:
        A CompressionHandle: `with handle.override(ratio=...)` for single passes, `handle.remove()` to undo.
        Every patched forward's output carries `kept_positions` [B, L'] (the original position of each row, -1 =
        padding slot of a shorter pruned sample).

    Raises:
        ValueError: an unsupported model class (the message lists the supported ones), bad settings.
    """
    if getattr(model, "_epic_ext_handle", None) is not None:
        raise RuntimeError("apply_compression: this model is already patched; call handle.remove() first")
    return compress_model(model, adapter_for(model), method, layer, ratio, keep, **method_kwargs)
