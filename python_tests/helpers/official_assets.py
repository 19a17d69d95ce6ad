"""Checkpoint directories with the released checkpoints' processor settings (the processor classes' defaults, which
the released configs keep) and tiny word-level tokenizers, for comparing the checkpoint's own processor (torchvision
stack) with epic_ext's fallback. Only the processor files (and, for LLaVA-OneVision, the model config its layout
comes from) are written: no weights."""

from __future__ import annotations

import json
import pathlib

# the answers' words, and what Qwen3-VL's frame times ("<1.2 seconds>") split into
WORDS = ("what", "is", "it", "this", "and", "?", "red", "blue", "a", "square", "moves", "<", ">", "seconds",
         *"0123456789")


def write_checkpoint(root: pathlib.Path, family: str, layout: str = "processor_config") -> str:
    """Writes root/<family>-<layout> and returns its path.

    layout: "processor_config" (transformers 5's one processor_config.json), "separate" (preprocessor_config.json +
    video_preprocessor_config.json with the checkpoint's own video settings: smaller pixel limits, the per-frame
    pixel cap, other normalisation) or "legacy" (preprocessor_config.json only, with min_pixels / max_pixels: the video processor
    takes the image's limits).
    """
    import transformers as T

    from helpers.chat_assets import (QWEN_CHAT_TEMPLATE, ONEVISION_CHAT_TEMPLATE, build_tiny_onevision_tokenizer,
                                     build_tiny_qwen_tokenizer)

    path = root / f"{family}-{layout}"
    if family in ("qwen2_5_vl", "qwen3_vl"):
        tokenizer = build_tiny_qwen_tokenizer(WORDS)
        if family == "qwen2_5_vl":
            image, video = T.Qwen2VLImageProcessor(), T.Qwen2VLVideoProcessor()
            processor = T.Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                              chat_template=QWEN_CHAT_TEMPLATE)
        else:
            image = T.Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                            size={"shortest_edge": 65536, "longest_edge": 16777216})
            video = T.Qwen3VLVideoProcessor()
            processor = T.Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                           chat_template=QWEN_CHAT_TEMPLATE)
    elif family == "llava_onevision":
        tokenizer = build_tiny_onevision_tokenizer(WORDS)
        config = T.LlavaOnevisionConfig()
        image = T.LlavaOnevisionImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints)
        video = T.LlavaOnevisionVideoProcessor()
        processor = T.LlavaOnevisionProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                              chat_template=ONEVISION_CHAT_TEMPLATE, num_image_tokens=729,
                                              vision_feature_select_strategy="full")
        path.mkdir(parents=True, exist_ok=True)
        config.vision_feature_select_strategy = "full"
        config.save_pretrained(str(path))
    else:
        raise ValueError(family)
    processor.save_pretrained(str(path))
    if layout == "processor_config":
        return str(path)
    combined = json.loads((path / "processor_config.json").read_text())
    image_settings, video_settings = combined.pop("image_processor"), combined.pop("video_processor")
    (path / "processor_config.json").write_text(json.dumps(combined))
    if layout == "separate":
        if "longest_edge" in video_settings.get("size", {}):  # Qwen: other limits, and the per-frame pixel cap
            video_settings["size"] = {"shortest_edge": video_settings["size"]["shortest_edge"] // 2,
                                      "longest_edge": video_settings["size"]["longest_edge"] // 3}
            video_settings["cap_pixels_per_frame"] = True
        video_settings["image_mean"], video_settings["image_std"] = [0.45, 0.46, 0.47], [0.22, 0.23, 0.24]
        (path / "video_preprocessor_config.json").write_text(json.dumps(video_settings))
    elif layout == "legacy":
        size = image_settings.pop("size")
        image_settings["min_pixels"], image_settings["max_pixels"] = size["shortest_edge"], size["longest_edge"] // 2
    else:
        raise ValueError(layout)
    (path / "preprocessor_config.json").write_text(json.dumps(image_settings))
    return str(path)


def smooth_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A smooth colour pattern (sines over the image) with sharp edges (a 12 x 9 checkerboard inverts half of it), in
    PIL `mode`: the edges make a wrong resample filter visible (bilinear vs bicubic: 0.2 - 0.4 in normalised units)
    while the PIL and torchvision bicubic backends stay within 0.03."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    freq, phase = rng.uniform(0.5, 3.0, (3, 2)), rng.uniform(0, 6.3, 3)
    channels = [127 + 120 * np.sin(freq[c, 0] * 3 * x / width + freq[c, 1] * 2 * y / height + phase[c])
                for c in range(3)]
    pixels = np.stack(channels, -1).astype(np.uint8)
    checker = ((x // max(width // 12, 1)) + (y // max(height // 9, 1))) % 2 == 0
    pixels[checker] = 255 - pixels[checker]
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = Image.fromarray((np.arange(width)[None].repeat(height, 0) * 255 // max(width, 1)).astype(np.uint8))
        image = image.convert("RGBA")
        image.putalpha(alpha)
        return image
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return image.convert(mode)
