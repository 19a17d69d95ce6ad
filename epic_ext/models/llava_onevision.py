"""LLaVA-OneVision adapter: LlavaOnevisionForConditionalGeneration / LlavaOnevisionModel (transformers 5.x), images
and video.

Same plumbing as LLaVA-1.5 (llava.py): the LlavaOnevisionModel is pre-hooked for the input ids, its
`language_model` (Qwen2 for the released checkpoints) is patched, positions are 1-D. What the family adds:
- two placeholder ids: `image_token_id` (anyres images, 729 tokens per crop for the SigLIP-384 checkpoints) and
  `video_token_id` (frames pooled 2x2, 196 tokens per frame, plus one newline slot after the last frame). Both
  are visual tokens: `ratio` / `keep` apply per sample over the union of its image and video tokens, and the
  compressors rank all of them together (a sample with an image and a video keeps `keep` tokens in total, split
  between them as the ranking falls).
- `image_newline` slots (after each row of an anyres grid, and after each video) carry the image / video id and are
  ranked and dropped like any visual token; see llava_next.py for why.
"""

from __future__ import annotations

from .adapter import register_adapter
from .llava import LlavaAdapter, image_token_id


def video_token_id(config) -> int | None:
    """config.video_token_id, or video_token_index in older configs."""
    token = getattr(config, "video_token_id", None)
    return getattr(config, "video_token_index", None) if token is None else token


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: image and video placeholder ids, 1-D positions."""

    name = "llava_onevision"
    model_class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")

    def visual_token_ids(self, config) -> tuple[int, ...]:
        image, video = image_token_id(config), video_token_id(config)
        if image is None or video is None:
            return ()
        return (image, video)


ADAPTER = register_adapter(LlavaOnevisionAdapter())
