"""Tiny LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL and Qwen3-VL models built from config (no download): for
tests, the demo and benchmarks on CPU.

The same classes as real checkpoints, only small: a 2-layer vision tower (CLIP; SigLIP for OneVision), an MLP
projector and a language model with grouped-query attention (Llama; Qwen2 for OneVision). Tiny Qwen2.5-VL and
Qwen3-VL (M-RoPE; Qwen3-VL with deepstack levels) are at the end.
"""

from __future__ import annotations

import torch


def tiny_llava_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      vocab_size: int = 256, image_size: int = 56, patch_size: int = 14, image_token_id: int | None = None,
                      pad_token_id: int = 0, max_positions: int = 2048, vision_hidden: int = 32,
                      vision_layers: int = 2, vision_feature_layer: int = -1, bos_token_id: int = 1,
                      eos_token_id: int = 2):
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
                       max_position_embeddings=max_positions, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, tie_word_embeddings=False)
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
                                vision_layers: int = 2, vision_use_head: bool = True):
    """LlavaOnevisionConfig: SigLIP tower with (image_size / patch_size)^2 features per crop (16 by default; video
    frames pooled to 4), anyres grids up to 2x2 crops, a Qwen2 language model with grouped-query attention. The
    image token is the last id, the video token the one before. vision_use_head=False is the released
    checkpoints' setting (no attention-pooling head, whose nn.MultiheadAttention reads its weights directly and so
    fails under ZeRO-3)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig  # noqa: PLC0415

    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch_size, vision_use_head=vision_use_head)
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


# ---------------------------------------------------------------------------------------------------- Qwen-VL --
def _qwen_text_kwargs(text_layers: int, hidden: int, heads: int, kv_heads: int, vocab_size: int, pad_token_id: int,
                      max_positions: int) -> dict:
    """Text-config kwargs shared by the tiny Qwen2.5-VL / Qwen3-VL: M-RoPE sections (t, h, w) of the rotary half
    dimension in the real checkpoints' proportions (1/4, 3/8, 3/8 for head_dim 16: [2, 3, 3])."""
    half = hidden // heads // 2
    spatial = half * 3 // 8
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                pad_token_id=pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half - 2 * spatial, spatial, spatial]})


def _qwen_token_ids(vocab_size: int) -> dict:
    """image / video / vision_start / vision_end at the top of the vocabulary."""
    return dict(image_token_id=vocab_size - 1, video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                vision_end_token_id=vocab_size - 4)


def tiny_qwen2_5_vl_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                           vocab_size: int = 256, pad_token_id: int = 0, max_positions: int = 2048,
                           vision_hidden: int = 32, vision_layers: int = 2, patch_size: int = 14):
    """Qwen2_5_VLConfig: an image of h x w patches (h, w even) gives h * w / 4 visual tokens; a video of t temporal
    patches t * h * w / 4."""
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  window_size=4 * patch_size, fullatt_block_indexes=[vision_layers - 1], tokens_per_second=2)
    # no bos / eos: the release defaults lie outside the tiny vocabulary, and no eos keeps generate's lengths fixed
    text = dict(_qwen_text_kwargs(text_layers, hidden, heads, kv_heads, vocab_size, pad_token_id, max_positions),
                bos_token_id=None, eos_token_id=None)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, pad_token_id=pad_token_id,
                            **_qwen_token_ids(vocab_size))


def tiny_qwen3_vl_config(*, text_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         vocab_size: int = 256, pad_token_id: int = 0, max_positions: int = 2048,
                         vision_hidden: int = 32, vision_layers: int = 3, patch_size: int = 14,
                         deepstack_levels: int = 3):
    """Qwen3VLConfig with `deepstack_levels` deepstack injections (after text layers 0 .. deepstack_levels - 1);
    visual tokens as for tiny_qwen2_5_vl_config, a video's frames each in their own span."""
    from transformers import Qwen3VLConfig  # noqa: PLC0415

    if not 0 <= deepstack_levels <= vision_layers:
        raise ValueError(f"deepstack_levels must be in [0, vision_layers={vision_layers}], got {deepstack_levels}")
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=list(range(deepstack_levels)))
    text = dict(_qwen_text_kwargs(text_layers, hidden, heads, kv_heads, vocab_size, pad_token_id, max_positions),
                head_dim=hidden // heads)
    return Qwen3VLConfig(vision_config=vision, text_config=text, pad_token_id=pad_token_id,
                         **_qwen_token_ids(vocab_size))


def _build(model_class, config, seed: int, attn_implementation: str, dtype: torch.dtype):
    torch.manual_seed(seed)
    model = model_class(config)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.to(dtype).eval()


def build_tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                          **config_kwargs):
    """A randomly initialised tiny Qwen2_5_VLForConditionalGeneration (eval mode)."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    return _build(Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config(**config_kwargs), seed,
                  attn_implementation, dtype)


def build_tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                        **config_kwargs):
    """A randomly initialised tiny Qwen3VLForConditionalGeneration (eval mode)."""
    from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415

    return _build(Qwen3VLForConditionalGeneration, tiny_qwen3_vl_config(**config_kwargs), seed, attn_implementation,
                  dtype)
