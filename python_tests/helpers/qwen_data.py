"""Batches for the Qwen2.5-VL / Qwen3-VL integration tests: per-sample layouts of text, images and videos, laid out
as the Qwen processors write them, left or right padded."""

from __future__ import annotations

import torch

PAD = 0


def _patch_values(model) -> int:
    vision = model.config.vision_config
    return vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2


def _sample(model, layout, generator):
    """(token ids, mm_token_type_ids, image grids, video grids, image patches, video patches) of one sample."""
    config = model.config
    merge = config.vision_config.spatial_merge_size ** 2
    per_frame = type(model).__name__.startswith("Qwen3")  # Qwen3-VL: "<t> <vision_start> frame <vision_end>" per frame
    start, end = config.vision_start_token_id, config.vision_end_token_id
    text_high = min(config.image_token_id, config.video_token_id, start, end)

    def text(n):
        return torch.randint(PAD + 1, text_high, (n,), generator=generator).tolist()

    ids, kinds, image_grids, video_grids, images, videos = [], [], [], [], [], []
    for part in layout:
        if isinstance(part, int):
            ids += text(part)
            kinds += [0] * part
        elif part[0] == "img":
            _, h, w = part
            n = h * w // merge
            ids += [start] + [config.image_token_id] * n + [end]
            kinds += [0] + [1] * n + [0]
            image_grids.append((1, h, w))
            images.append(torch.randn(h * w, _patch_values(model), generator=generator))
        elif part[0] == "vid":
            _, t, h, w = part
            frames = [(h * w // merge)] * t if per_frame else [t * h * w // merge]
            for n in frames:
                if per_frame:
                    ids += text(1)  # the frame's timestamp
                    kinds += [0]
                ids += [start] + [config.video_token_id] * n + [end]
                kinds += [0] + [2] * n + [0]
            video_grids.append((t, h, w))
            videos.append(torch.randn(t * h * w, _patch_values(model), generator=generator))
        else:
            raise ValueError(f"unknown layout part {part!r}")
    return ids, kinds, image_grids, video_grids, images, videos


def make_qwen_batch(model, layouts, padding="left", seed=0, sample_ids=None):
    """layouts: per sample, a list of parts: an int (that many random text tokens), ("img", h, w) (an image of h x w
    patches, h and w even: h * w / 4 visual tokens) or ("vid", t, h, w) (t temporal patches: t * h * w / 4 tokens).

    Sample i draws its tokens and pixels from its own seed (seed, sample_ids[i]; default i), so
    `make_qwen_batch(model, [layouts[b]], seed=s, sample_ids=[b])` is sample b of the batch alone, unpadded.
    Returns the processor's keys: input_ids, attention_mask, mm_token_type_ids, and pixel_values + image_grid_thw /
    pixel_values_videos + video_grid_thw when there are images / videos.
    """
    sample_ids = list(range(len(layouts))) if sample_ids is None else sample_ids
    samples = [_sample(model, layout, torch.Generator().manual_seed(seed * 1000 + i))
               for layout, i in zip(layouts, sample_ids)]
    length = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    kinds = torch.zeros(len(samples), length, dtype=torch.int)
    for b, (row, kind, *_) in enumerate(samples):
        cols = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        ids[b, cols] = torch.tensor(row)
        mask[b, cols] = 1
        kinds[b, cols] = torch.tensor(kind, dtype=torch.int)
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=kinds)
    image_grids = [g for s in samples for g in s[2]]
    video_grids = [g for s in samples for g in s[3]]
    if image_grids:
        batch["pixel_values"] = torch.cat([p for s in samples for p in s[4]])
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        batch["pixel_values_videos"] = torch.cat([p for s in samples for p in s[5]])
        batch["video_grid_thw"] = torch.tensor(video_grids)
    return batch
