"""A tiny LLaVA-NeXT checkpoint made offline: the demo's word-level tokenizer (``<s>``, ``</s>``, ``<image>`` last), a
LlavaNextProcessor with the PIL LlavaNextImageProcessor at the tiny model's 28 px crop and anyres grids (1x1, 1x2,
2x1, 2x2 crops), and a tiny LlavaNextForConditionalGeneration (CLIP tower: 2 x 2 features per crop after the CLS is
dropped); plus the shapes task on disk with images of several aspect ratios, so samples get different numbers of
``<image>`` tokens and crops, for the tests that run `python -m epic_ext.train` and `python -m epic_ext.eval`."""

from __future__ import annotations

import pathlib

NEXT_CROP = 28  # tiny CLIP crop: 2 x 2 features of 14 px
NEXT_PATCH = 14
# (width, height) the training images are resized to, in turn: 2x2 grid (square), 1x2 (wide), 2x1 (tall), 1x1
TRAIN_SIZES = ((56, 56), (56, 28), (30, 60), (28, 28))


def next_pinpoints(crop: int = NEXT_CROP) -> list[list[int]]:
    return [[crop, crop], [crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]]


def build_tiny_next_processor(words, save_dir: pathlib.Path | None = None):
    """LlavaNextProcessor: the demo tokenizer (epic_ext.demo.task.build_tiny_processor's), the PIL NeXT image
    processor (base crop resized to 28 px, anyres crops of 28 px, mean = std = 0.5), patch size 14, the CLS feature
    counted and dropped ("default") as the llava-hf checkpoints configure it."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from epic_ext.demo.task import build_tiny_processor

    tokenizer = build_tiny_processor(list(words), image_size=NEXT_CROP, patch_size=NEXT_PATCH).tokenizer
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": NEXT_CROP},
                                                 crop_size={"height": NEXT_CROP, "width": NEXT_CROP},
                                                 image_grid_pinpoints=next_pinpoints(), image_mean=[0.5, 0.5, 0.5],
                                                 image_std=[0.5, 0.5, 0.5])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=NEXT_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if save_dir is not None:
        processor.save_pretrained(str(save_dir))
    return processor


def build_tiny_next_model(tokenizer, seed: int = 0, **kwargs):
    """The tiny NeXT model for `tokenizer` (its <image> id is the last id, its pad id the tokenizer's)."""
    from epic_ext.models.tiny import build_tiny_llava_next

    model = build_tiny_llava_next(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  image_size=NEXT_CROP, patch_size=NEXT_PATCH, **kwargs)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    model.config.text_config.bos_token_id = tokenizer.bos_token_id
    model.config.text_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_next_train_assets(root: pathlib.Path) -> dict:
    """Writes root/model (tiny LLaVA-NeXT + processor) and root/data (the shapes task; the training images resized
    in turn to TRAIN_SIZES, the test images kept at 56 px); returns the paths as make_train_assets does."""
    from PIL import Image

    from epic_ext.data.records import load_records
    from epic_ext.demo.task import demo_vocabulary, make_shapes_task

    splits = make_shapes_task(root / "data", n_train=96, n_val=8, n_test=16, seed=1, image_size=56)
    for index, record in enumerate(load_records(splits["train"])):
        path = root / "data" / record["image"]
        with Image.open(path) as image:
            resized = image.convert("RGB").resize(TRAIN_SIZES[index % len(TRAIN_SIZES)], Image.BICUBIC)
        resized.save(path)
    model_dir = root / "model"
    processor = build_tiny_next_processor(demo_vocabulary(), save_dir=model_dir)
    model = build_tiny_next_model(processor.tokenizer, hidden=32, text_layers=2, heads=2, kv_heads=1)
    model.save_pretrained(str(model_dir))
    return {"root": root, "model": str(model_dir), "data": splits["train"], "test": splits["test"],
            "images": str(root / "data")}
