"""LLaVA-OneVision's visual inputs for training and evaluation: pixel values, image sizes and the number of
``<image>`` tokens each image becomes, counted as LlavaOnevisionModel produces its features (written here from the
model's rule, so a change on the transformers side shows up as a test failure, not as silently shifted labels).

The rule, for a crop of S px seen as a g x g feature grid (g = S / vision patch size, SigLIP: no CLS token):
- a sample with one image (anyres): the base crop (g^2 tokens) plus the grid of crops of the best-fitting
  `image_grid_pinpoints` resolution, as one (rows * g) x (cols * g) feature map, unpadded back to the image's
  aspect ratio, shrunk by bilinear interpolation when its area exceeds N crops ("anyres_max_N", ratio > 1.1), and
  one `image_newline` slot after each of its rows;
- a sample with several images: each image is padded to a square and only its base crop is used (g^2 tokens)
  plus one newline slot. The model learns which samples are which from `batch_num_images`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def select_best_resolution(height: int, width: int, resolutions: list) -> tuple[int, int]:
    """The (height, width) in `resolutions` that shows an image of height x width at the most pixels (scaled to fit,
    aspect kept, never counting more than the image has), ties broken by the least unused area; the first wins
    among equals."""
    best, best_shown, best_unused = None, -1, math.inf
    for res_height, res_width in resolutions:
        scale = min(res_width / width, res_height / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        unused = res_width * res_height - shown
        if shown > best_shown or (shown == best_shown and unused < best_unused):
            best, best_shown, best_unused = (int(res_height), int(res_width)), shown, unused
    return best


@dataclass(frozen=True)
class OnevisionLayout:
    """What the token count needs from a LlavaOnevisionConfig.

    Attributes:
        crop: vision_config.image_size (px of one crop).
        grid: features per crop side (crop / vision_config.patch_size).
        pinpoints: image_grid_pinpoints, [(height, width), ...] px.
        max_crops: N of vision_aspect_ratio "anyres_max_N".
    """

    crop: int
    grid: int
    pinpoints: tuple[tuple[int, int], ...]
    max_crops: int

    @classmethod
    def from_config(cls, config) -> OnevisionLayout:
        """Raises:
            ValueError: a vision_feature_select_strategy other than "full" (the released checkpoints' SigLIP setting;
                "default" drops a token per crop that SigLIP does not have, and the model rejects anyres then), or a
                vision_aspect_ratio not of the form "anyres_max_N"."""
        strategy = getattr(config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(f"LLaVA-OneVision with vision_feature_select_strategy={strategy!r} is not supported "
                             "(only 'full', the released checkpoints' setting)")
        aspect = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_"):].isdigit():
            raise ValueError(f"vision_aspect_ratio {aspect!r} is not of the form 'anyres_max_N'")
        vision = config.vision_config
        return cls(crop=int(vision.image_size), grid=int(vision.image_size) // int(vision.patch_size),
                   pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints),
                   max_crops=int(aspect[len("anyres_max_"):]))

    def crops(self, height: int, width: int, multi_image: bool) -> int:
        """Crops the image processor makes of an image (base crop included): 1 in a multi-image sample."""
        if multi_image:
            return 1
        best_height, best_width = select_best_resolution(height, width, self.pinpoints)
        return 1 + math.ceil(best_height / self.crop) * math.ceil(best_width / self.crop)

    def image_tokens(self, height: int, width: int, multi_image: bool) -> int:
        """The `<image>` tokens of one height x width image (base crop, unpadded anyres map, newline slots)."""
        base = self.grid * self.grid
        if multi_image:
            return base + 1
        best_height, best_width = select_best_resolution(height, width, self.pinpoints)
        rows, cols = best_height // self.crop * self.grid, best_width // self.crop * self.grid
        if width / height > cols / rows:  # wider than the map: bands of padding above and below
            rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
        shrink = math.sqrt(rows * cols / (self.max_crops * self.grid ** 2))
        if shrink > 1.1:
            rows, cols = int(rows // shrink), int(cols // shrink)
        return base + rows * (cols + 1)


def onevision_visual_inputs(image_processor, layout: OnevisionLayout, images: list) -> tuple[dict, list[int]]:
    """One sample's images through the (PIL) LLaVA-OneVision image processor.

    Returns:
        ({"pixel_values": [n, crops, C, S, S] float32 (crops padded to the sample's most), "image_sizes": [n, 2]
        int64 (height, width), "batch_num_images": [1] int64 (n)}, the `<image>` tokens of each image). Without
        images: pixel_values / image_sizes None, batch_num_images [0].

    Raises:
        ValueError: the processor made another number of crops than the model will read for an image (its
            image_grid_pinpoints or crop size differ from the model config's).
    """
    if not images:
        return {"pixel_values": None, "image_sizes": None,
                "batch_num_images": torch.zeros(1, dtype=torch.long)}, []
    processed = image_processor(images=[list(images)], return_tensors="pt")
    sizes = processed["image_sizes"].to(torch.long).reshape(len(images), 2)
    pixels = processed["pixel_values"].to(torch.float32)
    multi = len(images) > 1
    wanted = [layout.crops(int(h), int(w), multi) for h, w in sizes.tolist()]
    if pixels.shape[-1] != layout.crop or pixels.shape[1] < max(wanted):
        raise ValueError(f"the image processor made crops of {tuple(pixels.shape[1:])} for image sizes "
                         f"{sizes.tolist()}, the model reads {wanted} crops of {layout.crop} px: its "
                         "image_grid_pinpoints / size differ from the model config's")
    counts = [layout.image_tokens(int(h), int(w), multi) for h, w in sizes.tolist()]
    return {"pixel_values": pixels, "image_sizes": sizes,
            "batch_num_images": torch.tensor([len(images)], dtype=torch.long)}, counts


def pad_crops(pixel_values: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample [n_i, crops_i, C, S, S] -> [sum n_i, max crops_i, C, S, S] (zero crops appended; the model reads
    only the crops each image has)."""
    most = max(pixels.shape[1] for pixels in pixel_values)
    padded = [torch.nn.functional.pad(pixels, (0, 0, 0, 0, 0, 0, 0, most - pixels.shape[1]))
              for pixels in pixel_values]
    return torch.cat(padded)


def onevision_video_inputs(image_processor, layout: OnevisionLayout, frames: list,
                           settings: dict | None = None) -> tuple[dict, int]:
    """Fallback: one video (PIL frames, time order) as LLaVA-OneVision's video processor lays it out: every frame
    resized to its fixed size (aspect not kept; PIL, its resample filter), rescaled and normalised with its mean /
    std, the frames stacked; the model pools each frame's g x g features to ceil(g / 2)^2 and appends one newline
    slot per video.

    Args:
        image_processor: the PIL OneVision image processor (rescale and normalisation of one base crop).
        layout: the model's layout.
        frames: PIL images.
        settings: the checkpoint's video processor settings (epic_ext.data.video.video_settings); None: the
            image processor's normalisation at the model's crop size.

    Returns:
        ({"pixel_values_videos": [1, frames, C, S, S] float32}, the video's `<video>` tokens).

    Raises:
        ValueError: no frames, or a video processor size other than the model's crop.
    """
    from .video import resize_frames  # noqa: PLC0415

    if not frames:
        raise ValueError("onevision_video_inputs: a video needs at least one frame")
    settings = settings or {}
    size = settings.get("size") or {"height": layout.crop, "width": layout.crop}
    if (size.get("height"), size.get("width")) != (layout.crop, layout.crop):
        raise ValueError(f"the video processor's size {size} is not the model's crop ({layout.crop} px)")
    frames = resize_frames(list(frames), layout.crop, layout.crop, settings.get("resample", 3))
    normalize = {key: settings[key] for key in ("image_mean", "image_std", "rescale_factor") if key in settings}
    processed = image_processor(images=frames, return_tensors="pt", image_grid_pinpoints=[[layout.crop, layout.crop]],
                                **normalize)
    base = processed["pixel_values"][:, 0].to(torch.float32)  # each frame's base crop: the frame at S x S
    pooled = math.ceil(layout.grid / 2)
    return {"pixel_values_videos": base[None].contiguous()}, len(frames) * pooled * pooled + 1


def stack_videos(videos: list[torch.Tensor]) -> torch.Tensor:
    """Per-video [1, frames, C, S, S] -> [n_videos, frames, C, S, S].

    Raises:
        ValueError: videos with different frame counts (the model takes one 5-D tensor; padding frames would add
            video features).
    """
    counts = sorted({int(video.shape[1]) for video in videos})
    if len(counts) > 1:
        raise ValueError(f"LLaVA-OneVision batches videos of one frame count, got videos of {counts} frames")
    return torch.cat(videos)
