"""The independent reference of the Qwen2.5-VL / Qwen3-VL compression tests: the unpatched eager model on the full
sequence at its own 3-D M-RoPE positions, with the dropped visual tokens' keys hidden from layer K on (see
models/test_models_qwen_vl.py)."""

from __future__ import annotations

import copy

import torch


def visual_mask(model, input_ids):
    return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    return ref


class Reference:
    """The unpatched eager model on the full sequence (every token at its 3-D M-RoPE position from the model's own
    get_rope_index), with keys where keep_key [B, L] is False hidden from decoder layer `layer` on.

    Attributes:
        logits: [B, L, V].
        attentions: the unpatched model's own attention weights per layer (no hiding: for FastV's ranking).
        layer_inputs: [B, L, D] input of every decoder layer (deepstack levels of the layers before included).
    """

    def __init__(self, model, batch, layer, keep_key):
        ref = eager_copy(model)
        self.lm = lm = ref.model.language_model
        seen = {}
        hook = lm.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
        with torch.no_grad():
            self.attentions = ref(**batch, output_attentions=True).attentions
        hook.remove()
        mask = batch["attention_mask"].bool()
        length = mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed_full = causal[None] & mask[:, None, :]
        allowed_pruned = allowed_full & keep_key[:, None, :]
        minimum = torch.finfo(torch.float32).min
        self.positions = seen["position_ids"][-3:]  # [3, B, L] (t, h, w); generate's text row, if any, dropped
        deepstack, visual_rows = seen.get("deepstack_visual_embeds"), seen.get("visual_pos_masks")
        self.layer_inputs = []
        with torch.no_grad():
            hidden = seen["inputs_embeds"]
            self.cos_sin = lm.rotary_emb(hidden, self.positions)
            for i, decoder_layer in enumerate(lm.layers):
                self.layer_inputs.append(hidden)
                additive = torch.where(allowed_full if i < layer else allowed_pruned, 0.0, minimum)[:, None]
                hidden = decoder_layer(hidden, attention_mask=additive, position_embeddings=self.cos_sin)
                if deepstack is not None and i < len(deepstack):
                    hidden = hidden.clone()
                    hidden[visual_rows] = hidden[visual_rows] + deepstack[i]
            self.layer_inputs.append(hidden)
            self.logits = ref.lm_head(lm.norm(hidden))

    def post_rope_keys(self, layer_idx):
        """[B, Hkv, L, Dh] keys of decoder layer `layer_idx`, recomputed by hand (Qwen3-VL: per-head k_norm)."""
        attention = self.lm.layers[layer_idx].self_attn
        with torch.no_grad():
            x = self.lm.layers[layer_idx].input_layernorm(self.layer_inputs[layer_idx])
            batch_size, length = x.shape[:2]
            key = attention.k_proj(x).view(batch_size, length, -1, attention.head_dim)
            if hasattr(attention, "k_norm"):
                key = attention.k_norm(key)
            key = key.transpose(1, 2)
            cos, sin = (t[:, None] for t in self.cos_sin)
            half = key.shape[-1] // 2
            rotated = torch.cat([-key[..., half:], key[..., :half]], dim=-1)
            return key * cos + rotated * sin


def masked_reference(model, batch, layer, keep_key):
    return Reference(model, batch, layer, keep_key)


def kept_key_of(model, input_ids, kept_positions):
    """[B, L] bool: True at text tokens and at the kept visual tokens of a patched output's kept_positions."""
    keep_key = ~visual_mask(model, input_ids)
    for b in range(kept_positions.shape[0]):
        keep_key[b, kept_positions[b][kept_positions[b] >= 0]] = True
    return keep_key
