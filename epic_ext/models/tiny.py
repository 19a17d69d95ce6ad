"""Tiny LLaVA, LLaVA-NeXT and LLaVA-OneVision models built from config (no download): for tests, the demo and
benchmarks on CPU.

The same classes as real checkpoints, only small: a 2-layer vision tower (CLIP; SigLIP for OneVision), an MLP
projector and a language model with grouped-query attention (Llama; Qwen2 for OneVision).
"""

from __future__ import annotations

import torch


def tiny_llava_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      vocab_size: int = 256, image_size: int = 56, patch_size: int = 14, image_token_id: int | None = None,
                      pad_token_id: int = 0, max_positions: int = 2048, vision_hidden: int = 32,
                      vision_layers: int = 2):
    """LlavaConfig with (image_size / patch_size)^2 visual tokens per image (16 by default)."""
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
                       image_seq_length=tokens, vision_feature_select_strategy="default", vision_feature_layer=-1,
                       pad_token_id=pad_token_id)


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny LlavaForConditionalGeneration (eval mode)."""
    from transformers import LlavaForConditionalGeneration  # noqa: PLC0415

    config = tiny_llava_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.to(dtype).eval()


# Anyres grids of the tiny NeXT / OneVision models, in units of the crop size: 1x1, 1x2, 2x1, 2x2 crops.
def _pinpoints(crop: int) -> list[list[int]]:
    return [[crop, crop], [crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]]


def tiny_llava_next_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                           vocab_size: int = 256, image_size: int = 28, patch_size: int = 14,
                           pad_token_id: int = 0, max_positions: int = 2048, vision_hidden: int = 32,
                           vision_layers: int = 2):
    """LlavaNextConfig: CLIP tower with (image_size / patch_size)^2 features per crop (4 by default), anyres grids up
    to 2x2 crops, a Llama language model with grouped-query attention. The image token is the last id."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig  # noqa: PLC0415

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                       max_position_embeddings=max_positions, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1,
                           image_grid_pinpoints=_pinpoints(image_size), vision_feature_select_strategy="default",
                           vision_feature_layer=-1, pad_token_id=pad_token_id)


def build_tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                          **config_kwargs):
    """A randomly initialised tiny LlavaNextForConditionalGeneration (eval mode)."""
    from transformers import LlavaNextForConditionalGeneration  # noqa: PLC0415

    config = tiny_llava_next_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.to(dtype).eval()


def tiny_llava_onevision_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                                vocab_size: int = 256, image_size: int = 28, patch_size: int = 7,
                                pad_token_id: int = 0, max_positions: int = 4096, vision_hidden: int = 32,
                                vision_layers: int = 2):
    """LlavaOnevisionConfig: SigLIP tower with (image_size / patch_size)^2 features per crop (16 by default; video
    frames pooled to 4), anyres grids up to 2x2 crops, a Qwen2 language model with grouped-query attention. The
    image token is the last id, the video token the one before."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig  # noqa: PLC0415

    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch_size)
    text = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                       max_position_embeddings=max_positions, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                                video_token_index=vocab_size - 2, image_grid_pinpoints=_pinpoints(image_size),
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                pad_token_id=pad_token_id)


def build_tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                               **config_kwargs):
    """A randomly initialised tiny LlavaOnevisionForConditionalGeneration (eval mode)."""
    from transformers import LlavaOnevisionForConditionalGeneration  # noqa: PLC0415

    config = tiny_llava_onevision_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.to(dtype).eval()
