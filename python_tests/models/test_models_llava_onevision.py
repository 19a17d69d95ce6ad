"""apply_compression on a tiny LlavaOnevisionForConditionalGeneration (anyres images, videos, newline slots)
against the independent masked eager reference of model_reference.py. Image and video tokens are one visual budget
per sample."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from epic_ext.models import apply_compression  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava_onevision  # noqa: E402
from helpers.attn_cases import ATTN_CASES, AttnCase  # noqa: E402
from helpers.model_reference import (  # noqa: E402
    MultimodalBatch, check_against_reference, check_batched_generate_equals_single, check_ratio_zero_and_remove)

# Different image sizes, an image and a video in one sample, a video alone, two images, text only.
LAYOUTS = [[3, ("img", (28, 28)), 6],
           [5, ("img", (50, 40)), 2, ("video", 3), 1],
           [4, ("video", 3), 9],
           [2, ("img", (28, 28)), 3, ("img", (56, 28)), 2],
           [7]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava_onevision(seed=0)


def test_layouts_mix_images_and_video(model):
    data = MultimodalBatch(model, LAYOUTS, seed=0)
    ids = data.batch["input_ids"]
    images = (ids == model.config.image_token_id).sum(1).tolist()
    videos = (ids == model.config.video_token_id).sum(1).tolist()
    assert images[1] > 0 and videos[1] > 0, "sample 1 has an image and a video"
    assert images[2] == 0 and videos[2] > 0, "sample 2 has a video only"
    assert len({i + v for i, v in zip(images[:4], videos[:4])}) == 4, "different visual-token counts"
    assert images[4] == videos[4] == 0


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method, layer", [("fastv", 2), ("fastv", 0), ("dart", 1), ("dart", 3), ("random", 2)])
def test_matches_masked_eager_reference(model, method, layer, padding):
    check_against_reference(model, LAYOUTS, method, padding, layer, seed=layer + 10 * len(method), keep=6)


@pytest.mark.parametrize("attn", ATTN_CASES)
@pytest.mark.parametrize("method, layer", [("fastv", 2), ("dart", 1)])
def test_matches_masked_eager_reference_under_each_attention(model, method, layer, attn, monkeypatch):
    """Scoring (FastV's queries and keys, DART's keys) and pruning under eager and flash attention
    (helpers.attn_cases)."""
    check_against_reference(model, LAYOUTS, method, "right", layer, seed=29, attn_case=AttnCase(attn, monkeypatch),
                            keep=6)


@pytest.mark.parametrize("method", ["fastv", "dart", "random"])
def test_ratio_matches_masked_eager_reference(model, method):
    check_against_reference(model, LAYOUTS, method, "right", 2, seed=5, ratio=0.7)


def test_video_tokens_are_compressed_with_the_same_ratio(model):
    """A video-only sample keeps floor((1 - ratio) * n + 0.5) of its n video tokens, as an image-only one does."""
    data = MultimodalBatch(model, [[4, ("video", 3), 9], [3, ("img", (28, 28)), 6]], padding="left", seed=8)
    visual = data.visual_mask()
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    try:
        with torch.no_grad():
            kept = model(**data.batch).kept_positions
    finally:
        handle.remove()
    for b in range(2):
        positions = kept[b][kept[b] >= 0]
        n = int(visual[b].sum())
        assert int(visual[b, positions].sum()) == int(0.5 * n + 0.5), f"sample {b}"


def test_batched_generate_equals_per_sample(model):
    check_batched_generate_equals_single(model, LAYOUTS[:3] + LAYOUTS[4:], "fastv", layer=2, seed=3, keep=5)


def test_batched_generate_equals_per_sample_dart_ratio(model):
    check_batched_generate_equals_single(model, LAYOUTS[1:4], "dart", layer=1, seed=4, ratio=0.5)


def test_ratio_zero_and_remove_reproduce_unpatched(model):
    check_ratio_zero_and_remove(model, LAYOUTS, seed=6)
