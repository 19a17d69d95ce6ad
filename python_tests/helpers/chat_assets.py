"""Tiny chat-template checkpoints made offline (no download): a word-level tokenizer with the Qwen2-VL chat template
(system prompt, <|im_start|> / <|im_end|> turns, <|vision_start|><|image_pad|><|vision_end|> per image), the PIL
Qwen2-VL image processor, and a tiny Qwen2.5-VL / Qwen3-VL from config; plus the shapes QA task on disk, for the
tests that run `python -m epic_ext.train` on these families."""

from __future__ import annotations

import pathlib

# The Qwen2-VL / Qwen2.5-VL instruct template (as published with the checkpoints), without the tool-call branches.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE_WORDS = ("system", "you", "are", "a", "helpful", "assistant", "user", ".")
SPECIAL = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>")
# the tiny Qwen configs put image / video / vision_start / vision_end at vocab_size - 1, -2, -3, -4
VISION_TOKENS = ("<|vision_end|>", "<|vision_start|>", "<|video_pad|>", "<|image_pad|>")
IMAGE_SIZE = 84  # 6 x 6 patches of 14 px: 9 visual tokens per image after the 2 x 2 merge


def build_tiny_qwen_tokenizer(words):
    """Word-level fast tokenizer: <|endoftext|> (pad) 0, <unk> 1, <|im_start|> 2, <|im_end|> 3 (eos), the words,
    then the four vision tokens at the top of the vocabulary; the Qwen chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reserved = {*SPECIAL, *VISION_TOKENS}
    words = [w for w in dict.fromkeys(w.lower() for w in [*TEMPLATE_WORDS, *words]) if w not in reserved]
    vocab = {token: index for index, token in enumerate([*SPECIAL, *words, *VISION_TOKENS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([*SPECIAL, *VISION_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=IMAGE_SIZE * IMAGE_SIZE, patch_size=14,
                                    merge_size=2, temporal_patch_size=2)


def make_qwen_train_assets(root: pathlib.Path, family: str = "qwen2_5_vl") -> dict:
    """Writes root/model (tiny `family` model + tokenizer + image processor) and root/data (the shapes task at
    84 px); returns the paths as make_train_assets does."""
    from epic_ext.models.tiny import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl
    from epic_ext.demo.task import demo_vocabulary, make_shapes_task

    splits = make_shapes_task(root / "data", n_train=96, n_val=8, n_test=16, seed=1, image_size=IMAGE_SIZE)
    tokenizer = build_tiny_qwen_tokenizer(demo_vocabulary())
    model_dir = root / "model"
    tokenizer.save_pretrained(str(model_dir))
    build_tiny_qwen_image_processor().save_pretrained(str(model_dir))
    write_processor_config(model_dir, {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family])
    builder = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl}[family]
    model = builder(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden=32,
                    text_layers=2, heads=2, kv_heads=1)
    model.save_pretrained(str(model_dir))
    return {"root": root, "model": str(model_dir), "data": splits["train"], "test": splits["test"],
            "images": str(root / "data")}


# ------------------------------------------------------------------------------------------- LLaVA-OneVision --
# The template published with the llava-onevision-qwen2-*-ov-hf checkpoints: no system prompt, "<image>\n" per image
# (all images first), answers in {% generation %} blocks, "<|im_end|>\n" after every turn.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the tiny OneVision config puts image / video at vocab_size - 1, -2
ONEVISION_TOKENS = ("<video>", "<image>")
ONEVISION_CROP = 28  # tiny SigLIP crop: 4 x 4 features of 7 px


def build_tiny_onevision_tokenizer(words):
    """Word-level fast tokenizer like build_tiny_qwen_tokenizer's, with <video> / <image> at the top of the
    vocabulary and the OneVision chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reserved = {*SPECIAL, *ONEVISION_TOKENS}
    words = [w for w in dict.fromkeys(w.lower() for w in [*TEMPLATE_WORDS, *words]) if w not in reserved]
    vocab = {token: index for index, token in enumerate([*SPECIAL, *words, *ONEVISION_TOKENS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([*SPECIAL, *ONEVISION_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    return tokenizer


def build_tiny_onevision_image_processor(crop: int = ONEVISION_CROP):
    """The PIL OneVision image processor at the tiny model's crop size and anyres grids (up to 2 x 2 crops)."""
    from transformers import LlavaOnevisionImageProcessorPil

    pinpoints = [[crop, crop], [crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]]
    return LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def write_processor_config(model_dir: pathlib.Path, processor_class: str, **settings) -> None:
    """processor_config.json naming the checkpoint's processor class (and its own settings), as released checkpoints
    carry it: AutoProcessor then builds the whole processor (the image processor from preprocessor_config.json, the
    video processor from video_preprocessor_config.json or, without one, from the image processor's settings)."""
    import json

    (model_dir / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **settings}))


def write_tiny_onevision_video_config(model_dir: pathlib.Path, crop: int = ONEVISION_CROP) -> None:
    """The tiny checkpoint's video processor settings (the crop size, the image processor's normalisation), as a
    checkpoint's video_preprocessor_config.json (the class default, 384 px, is not the tiny crop)."""
    import json

    (model_dir / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": crop, "width": crop},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))


def make_onevision_train_assets(root: pathlib.Path, image_size: int = ONEVISION_CROP) -> dict:
    """Writes root/model (tiny LLaVA-OneVision + tokenizer + image processor) and root/data (the shapes task at
    `image_size` px); returns the paths as make_qwen_train_assets does."""
    from epic_ext.models.tiny import build_tiny_llava_onevision
    from epic_ext.demo.task import demo_vocabulary, make_shapes_task

    splits = make_shapes_task(root / "data", n_train=96, n_val=8, n_test=16, seed=1, image_size=image_size)
    tokenizer = build_tiny_onevision_tokenizer(demo_vocabulary())
    model_dir = root / "model"
    tokenizer.save_pretrained(str(model_dir))
    build_tiny_onevision_image_processor().save_pretrained(str(model_dir))
    write_tiny_onevision_video_config(model_dir)
    write_processor_config(model_dir, "LlavaOnevisionProcessor", num_image_tokens=(ONEVISION_CROP // 7) ** 2,
                           vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    model = build_tiny_llava_onevision(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       hidden=32, text_layers=2, heads=2, kv_heads=1, vision_use_head=False)
    model.save_pretrained(str(model_dir))
    return {"root": root, "model": str(model_dir), "data": splits["train"], "test": splits["test"],
            "images": str(root / "data")}
