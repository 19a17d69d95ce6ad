"""Batches for the LLaVA integration tests: per-sample text/image layouts, left or right padding."""

from __future__ import annotations

import torch

PAD = 0


def make_llava_batch(model, layouts, padding="left", seed=0):
    """layouts: per sample, a list like [3, "img", 5] (text-token counts and images).

    Returns dict(input_ids, attention_mask, pixel_values) with pixel_values None when there is no image.
    """
    g = torch.Generator().manual_seed(seed)
    image_token = model.config.image_token_id
    tokens_per_image = model.config.image_seq_length
    size = model.config.vision_config.image_size
    vocab = model.config.text_config.vocab_size
    rows, n_images = [], 0
    for layout in layouts:
        row = []
        for part in layout:
            if part == "img":
                row += [image_token] * tokens_per_image
                n_images += 1
            else:
                row += torch.randint(1, image_token - 1 if image_token < vocab else vocab - 2, (part,),
                                     generator=g).tolist()
        rows.append(row)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        if padding == "left":
            ids[b, length - len(row):] = torch.tensor(row)
            mask[b, length - len(row):] = 1
        else:
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
    pixel_values = torch.randn(n_images, 3, size, size, generator=g) if n_images else None
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
