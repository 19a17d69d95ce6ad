"""Tiny LLaVA models built from config (no download): for tests, the demo and benchmarks on CPU.

The same LlavaForConditionalGeneration class as real checkpoints, only small: a 2-layer CLIP vision tower, an MLP
projector and a Llama language model with grouped-query attention.
"""

from __future__ import annotations

import torch


def tiny_llava_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      vocab_size: int = 256, image_size: int = 56, patch_size: int = 14, image_token_id: int | None = None,
                      pad_token_id: int = 0, max_positions: int = 2048, vision_hidden: int = 32,
                      vision_layers: int = 2, vision_feature_layer: int = -1):
    """LlavaConfig with (image_size / patch_size)^2 visual tokens per image (16 by default).

    vision_feature_layer: the vision tower's hidden state the projector reads (-1: the last layer's output; 0: the
    patch embeddings with position embeddings, after CLIP's pre-layernorm, i.e. purely local features per patch).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: PLC0415

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                       max_position_embeddings=max_positions, pad_token_id=pad_token_id, tie_word_embeddings=False)
    image_token_id = vocab_size - 1 if image_token_id is None else image_token_id
    tokens = (image_size // patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       image_seq_length=tokens, vision_feature_select_strategy="default",
                       vision_feature_layer=vision_feature_layer,
                       pad_token_id=pad_token_id)


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny LlavaForConditionalGeneration (eval mode)."""
    from transformers import LlavaForConditionalGeneration  # noqa: PLC0415

    config = tiny_llava_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.to(dtype).eval()
