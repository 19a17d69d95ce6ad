"""apply_compression on a tiny LlavaNextForConditionalGeneration (anyres images, newline slots) against the
independent masked eager reference of model_reference.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from epic_ext.models import apply_compression, supported_classes  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava_next  # noqa: E402
from helpers.attn_cases import ATTN_CASES, AttnCase  # noqa: E402
from helpers.model_reference import (  # noqa: E402
    MultimodalBatch, check_against_reference, check_batched_generate_equals_single, check_ratio_zero_and_remove)

# Different image sizes (10, 24, 20 and 36 visual tokens incl. newline slots), two images in one sample, text only.
LAYOUTS = [[3, ("img", (28, 28)), 6],
           [5, ("img", (50, 40)), 2, ("img", (28, 56)), 1],
           [4, ("img", (56, 56)), 9],
           [7]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava_next(seed=0)


def test_layouts_have_different_visual_counts(model):
    data = MultimodalBatch(model, LAYOUTS, seed=0)
    counts = data.visual_mask().sum(1).tolist()
    assert counts[3] == 0 and len(set(counts[:3])) == 3, counts


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method, layer", [("fastv", 2), ("fastv", 0), ("dart", 1), ("dart", 3), ("random", 2)])
def test_matches_masked_eager_reference(model, method, layer, padding):
    check_against_reference(model, LAYOUTS, method, padding, layer, seed=layer + 10 * len(method), keep=6)


@pytest.mark.parametrize("attn", ATTN_CASES)
@pytest.mark.parametrize("method, layer", [("fastv", 2), ("dart", 1)])
def test_matches_masked_eager_reference_under_each_attention(model, method, layer, attn, monkeypatch):
    """Scoring (FastV's queries and keys, DART's keys) and pruning under eager and flash attention
    (helpers.attn_cases)."""
    check_against_reference(model, LAYOUTS, method, "left", layer, seed=29, attn_case=AttnCase(attn, monkeypatch),
                            keep=6)


@pytest.mark.parametrize("method", ["fastv", "dart", "random"])
def test_ratio_matches_masked_eager_reference(model, method):
    check_against_reference(model, LAYOUTS, method, "left", 2, seed=5, ratio=0.6)


def test_batched_generate_equals_per_sample(model):
    check_batched_generate_equals_single(model, LAYOUTS, "fastv", layer=2, seed=3, keep=5)


def test_batched_generate_equals_per_sample_dart_ratio(model):
    check_batched_generate_equals_single(model, LAYOUTS[:3], "dart", layer=1, seed=4, ratio=0.5)


def test_ratio_zero_and_remove_reproduce_unpatched(model):
    check_ratio_zero_and_remove(model, LAYOUTS, seed=6)


def test_keep_more_than_visual_tokens_names_the_argument(model):
    data = MultimodalBatch(model, LAYOUTS, seed=7)
    handle = apply_compression(model, "fastv", layer=2, keep=11)
    try:
        with pytest.raises(ValueError, match="keep=11 is more than the 10 visual tokens"):
            with torch.no_grad():
                model(**data.batch)
    finally:
        handle.remove()


def test_dispatch_lists_supported_classes():
    assert {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
            "LlavaOnevisionForConditionalGeneration"} <= set(supported_classes())
    with pytest.raises(ValueError, match="supported classes: .*LlavaNextForConditionalGeneration"):
        apply_compression(torch.nn.Linear(2, 2), "fastv", layer=1, keep=2)
