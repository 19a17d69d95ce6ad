"""The checkpoints' video processors, re-implemented for the fallback path (no torchvision).

transformers builds the Qwen2-VL / Qwen2.5-VL / Qwen3-VL and LLaVA-OneVision video processors only with torchvision.
Without it, epic_ext lays a video out itself (epic_ext.data.chat.ChatProcessor): the settings below are read from the
checkpoint as transformers reads them, the frame size follows the video processor's own resize rule (its own pixel
limits, which differ from the image processor's), the frames are resized with PIL and then rescaled, normalised and
patched by the checkpoint's (PIL) image processor. The official processors are the reference: the torchvision test
stack compares the two paths on many frame counts and sizes (python_tests/data/test_data_official.py), and the
defaults here are compared with the video processor classes' own there.
"""

from __future__ import annotations

import json
import math
import os

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD = [0.5, 0.5, 0.5]
BICUBIC = 3

# The class defaults of each video processor (transformers 5.17 - 5.25), by its video_processor_type.
VIDEO_DEFAULTS: dict[str, dict] = {
    "Qwen2VLVideoProcessor": {
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "resample": BICUBIC, "rescale_factor": 1 / 255, "cap_pixels_per_frame": None, "max_video_tokens": 128000},
    "Qwen3VLVideoProcessor": {
        "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}, "patch_size": 16,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD,
        "resample": BICUBIC, "rescale_factor": 1 / 255, "cap_pixels_per_frame": None, "max_video_tokens": 768},
    "LlavaOnevisionVideoProcessor": {
        "size": {"height": 384, "width": 384}, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "resample": BICUBIC, "rescale_factor": 1 / 255},
}
# the video processor transformers builds from an older checkpoint's preprocessor_config.json, by its image processor
IMAGE_TO_VIDEO = {"Qwen2VLImageProcessor": "Qwen2VLVideoProcessor",
                  "LlavaOnevisionImageProcessor": "LlavaOnevisionVideoProcessor"}
SETTING_KEYS = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "resample",
                "rescale_factor", "cap_pixels_per_frame", "max_video_tokens", "do_resize", "do_normalize",
                "do_rescale")


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def video_settings(path: str, video_processor_type: str) -> dict:
    """The video processor's settings of a checkpoint directory, found where transformers looks: its
    video_preprocessor_config.json, else processor_config.json's "video_processor" entry, else (older checkpoints)
    preprocessor_config.json, the image processor's file, whose pixel limits the video processor then takes (and
    whose image processor decides the video processor's class: a Qwen3-VL checkpoint without a video config gets
    the Qwen2-VL video processor, as in transformers); over the class defaults. The class is
    settings["video_processor_type"]. ``min_pixels`` / ``max_pixels`` become size's shortest / longest edge, as the Qwen2-VL video
    processor does (the Qwen3-VL one ignores them).

    Raises:
        ValueError: an unknown video_processor_type.
    """
    if video_processor_type not in VIDEO_DEFAULTS:
        raise ValueError(f"video_settings: no fallback for the video processor {video_processor_type!r} (known: "
                         f"{', '.join(VIDEO_DEFAULTS)}); install torchvision to use the checkpoint's own")
    found = _read_json(os.path.join(path, "video_preprocessor_config.json"))
    if found is None:
        found = (_read_json(os.path.join(path, "processor_config.json")) or {}).get("video_processor")
    kind = video_processor_type
    if found is None:  # transformers then builds the video processor of the image processor's family
        found = _read_json(os.path.join(path, "preprocessor_config.json")) or {}
        kind = IMAGE_TO_VIDEO.get(str(found.get("image_processor_type", "")).removesuffix("Pil"), kind)
    kind = found.get("video_processor_type") or kind
    if kind not in VIDEO_DEFAULTS:
        raise ValueError(f"video_settings: {path} names the video processor {kind!r}, which has no fallback (known: "
                         f"{', '.join(VIDEO_DEFAULTS)}); install torchvision to use the checkpoint's own")
    settings = {key: (dict(value) if isinstance(value, dict) else value)
                for key, value in VIDEO_DEFAULTS[kind].items()}
    settings["video_processor_type"] = kind
    for key in SETTING_KEYS:
        if key in found and found[key] is not None:
            settings[key] = dict(found[key]) if isinstance(found[key], dict) else found[key]
    for key in ("image_mean", "image_std"):
        if isinstance(settings.get(key), (list, tuple)):
            settings[key] = [float(value) for value in settings[key]]
    if "min_pixels" in found or "max_pixels" in found:
        size = dict(settings["size"])
        if found.get("min_pixels") is not None:
            size["shortest_edge"] = found["min_pixels"]
        if found.get("max_pixels") is not None:
            size["longest_edge"] = found["max_pixels"]
        settings["size"] = size
    return settings


def qwen_frame_size(num_frames: int, height: int, width: int, settings: dict, video_processor_type: str
                    ) -> tuple[int, int]:
    """(height, width) every frame of a video is resized to by the Qwen2-VL (per frame) or Qwen3-VL (over the clip)
    video processor's resize rule.

    Raises:
        ValueError: an aspect ratio above 200, or fewer frames than the temporal patch (Qwen3-VL), as the processors.
    """
    factor = int(settings["patch_size"]) * int(settings["merge_size"])
    temporal = int(settings["temporal_patch_size"])
    size = settings["size"]
    shortest, longest = int(size["shortest_edge"]), int(size["longest_edge"])
    cap = bool(settings.get("cap_pixels_per_frame"))
    if video_processor_type == "Qwen2VLVideoProcessor":
        max_pixels = longest
        if cap:
            total = int(int(settings["max_video_tokens"]) * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * temporal // num_frames), int(shortest * 1.05))
        return _smart_resize_2d(height, width, factor, shortest, max_pixels)
    max_pixels = longest
    if cap:
        per_frame = max(min(int(settings["max_video_tokens"]) * factor * factor, longest // num_frames),
                        int(shortest * 1.05))
        max_pixels = per_frame * num_frames
    if num_frames < temporal:
        raise ValueError(f"a Qwen3-VL video needs at least {temporal} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < shortest:
        beta = math.sqrt(shortest / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_aspect(height: int, width: int) -> None:
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")


def _smart_resize_2d(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    _check_aspect(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_timestamps(num_frames: int, fps: float, temporal_patch_size: int) -> list[float]:
    """Qwen3-VL's prompt time of each temporal patch: the frame indices (padded to a multiple of the temporal patch
    by repeating the last) over fps, averaged over the first and last frame of each patch."""
    indices = list(range(num_frames))
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [index / fps for index in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def resize_frames(frames: list, height: int, width: int, resample: int) -> list:
    """The frames as RGB PIL images of height x width (PIL's filter `resample`, the processors' own)."""
    from PIL import Image  # noqa: PLC0415

    return [frame.convert("RGB").resize((width, height), resample=Image.Resampling(int(resample)))
            for frame in frames]
