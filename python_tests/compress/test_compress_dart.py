"""DART (epic_ext.compress.dart) against a plain reference of the published algorithm.

The reference is written from the algorithm's description, one sample at a time in Python floats (fp64): pivots by
the L1 norm of layer K-1's keys, then for each pivot in position order the least cosine-similar visual tokens on
final_norm(layer K-1 output), with the exact budget and the stated tie rules. It is checked on random keys and
features (odd budgets, keep < image_pivots, several images, text-only samples, different keeps per sample, samples
with fewer prompt text tokens than text_pivots) and inside a tiny LLaVA through apply_compression.
"""

from __future__ import annotations

import math

import pytest
import torch

from epic_ext.compress import LayerContext, get_compressor
from helpers.dart_reference import reference_dart


# ------------------------------------------------------------------------------------------------ reference --
def make_context(layouts, keep, *, dim=24, heads=2, head_dim=8, dtype=torch.float64, seed=0):
    """layouts: per sample, parts ("pad"|"text"|"img"|"answer", n); returns (ctx, tensors for the reference)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layout in layouts:
        rows.append([kind for kind, n in layout for _ in range(n)])
    length = max(len(r) for r in rows)
    rows = [r + ["pad"] * (length - len(r)) for r in rows]
    batch = len(rows)
    image = torch.tensor([[k == "img" for k in r] for r in rows])
    real = torch.tensor([[k != "pad" for k in r] for r in rows])
    prompt = torch.tensor([[k in ("text", "img") for k in r] for r in rows])
    hidden = torch.randn(batch, length, dim, generator=g, dtype=torch.float64).to(dtype)
    key = torch.randn(batch, heads, length, head_dim, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.rand(dim, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    eps = 1e-6

    def final_norm(h):
        h64 = h.double()
        return (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(h.dtype)

    spans = [[(s, n) for s, n in _spans(image[b].tolist())] for b in range(batch)]
    ctx = LayerContext(hidden_states=hidden, image_mask=image, attention_mask=real.long(),
                       query_positions=torch.zeros(batch, 1, dtype=torch.long), prompt_mask=prompt & real,
                       keep=torch.tensor(keep), keep_counts=list(keep), max_keep=max(keep), spans=spans, key=key,
                       final_norm=final_norm)
    return ctx, dict(hidden=hidden, key=key, weight=weight.double().tolist(), eps=eps, image=image,
                     prompt=prompt & real)


def _spans(row):
    spans, start = [], None
    for i, flag in enumerate(row + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i - start))
            start = None
    return spans


def kept_lists(selected: torch.Tensor) -> list[list[int]]:
    return [[p for p in row if p >= 0] for row in selected.tolist()]


CASES = {
    # name: (layouts, keep per sample, image_pivots, text_pivots)
    "odd budgets": ([[("text", 3), ("img", 40), ("text", 9)]] * 3, [13, 7, 23], 4, 4),
    "keep below image pivots": ([[("text", 2), ("img", 30), ("text", 6)]] * 3, [1, 3, 4], 4, 4),
    "several images": ([[("text", 2), ("img", 20), ("text", 3), ("img", 25), ("text", 5)],
                        [("img", 16), ("text", 1), ("img", 16), ("text", 2), ("answer", 4)]], [17, 11], 4, 4),
    "text-only sample in the batch": ([[("text", 12)], [("text", 4), ("img", 36), ("text", 7)]], [0, 19], 4, 4),
    "different keeps, left padding": ([[("pad", 9), ("text", 3), ("img", 24), ("text", 5)],
                                       [("text", 2), ("img", 30), ("text", 8), ("answer", 3)],
                                       [("pad", 4), ("text", 1), ("img", 33), ("text", 2)]], [5, 29, 10], 4, 4),
    "fewer prompt text tokens than text pivots": ([[("text", 5), ("img", 28), ("text", 1), ("answer", 6)],
                                                   [("text", 5), ("img", 28), ("answer", 6)]], [15, 15], 4, 4),
    "image pivots only": ([[("text", 3), ("img", 26), ("text", 4)]] * 2, [9, 14], 3, 0),
    "many pivots": ([[("text", 3), ("img", 48), ("text", 20)]] * 2, [31, 48], 8, 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dart_matches_reference(case, seed):
    layouts, keep, n_img, n_txt = CASES[case]
    ctx, ref = make_context(layouts, keep, seed=seed)
    selected = get_compressor("dart", image_pivots=n_img, text_pivots=n_txt).select(ctx)
    assert selected.shape == (len(layouts), max(keep)) and selected.dtype == torch.long
    got = kept_lists(selected)
    assert [len(g) for g in got] == keep, "every sample keeps exactly its budget"
    assert got == reference_dart(**ref, keep=keep, image_pivots=n_img, text_pivots=n_txt)


def test_dart_fp32_matches_fp64_reference():
    layouts, keep, n_img, n_txt = CASES["different keeps, left padding"]
    ctx, ref = make_context(layouts, keep, dtype=torch.float32, seed=5)
    got = kept_lists(get_compressor("dart", image_pivots=n_img, text_pivots=n_txt).select(ctx))
    assert got == reference_dart(**ref, keep=keep, image_pivots=n_img, text_pivots=n_txt)


def test_dart_features_are_normed_hidden_states_not_keys():
    """The picks follow the features: scaling one token's hidden state leaves the RMS-normed features (and the
    choice) unchanged, while replacing the final norm's weight changes it."""
    layouts, keep = [[("text", 3), ("img", 40), ("text", 6)]], [21]
    ctx, ref = make_context(layouts, keep, seed=7)
    dart = get_compressor("dart")
    base = kept_lists(dart.select(ctx))
    ctx.hidden_states = ctx.hidden_states.clone()
    ctx.hidden_states[0, 10] *= 7.0
    assert kept_lists(dart.select(ctx)) == base
    weight = torch.linspace(0.1, 3.0, ctx.hidden_states.shape[-1], dtype=torch.float64)
    ctx.final_norm = lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    ref["weight"] = weight.tolist()
    changed = kept_lists(dart.select(ctx))
    assert changed == reference_dart(**ref, keep=keep, image_pivots=4, text_pivots=4)
    assert changed != base


def test_dart_needs_keys_and_norm():
    ctx, _ = make_context([[("text", 2), ("img", 10)]], [3])
    dart = get_compressor("dart")
    ctx.final_norm = None
    with pytest.raises(RuntimeError, match="final_norm"):
        dart.select(ctx)
    ctx.key = None
    with pytest.raises(RuntimeError, match="keys"):
        dart.select(ctx)
    with pytest.raises(ValueError, match="image_pivots must be >= 1"):
        get_compressor("dart", image_pivots=0)


# ------------------------------------------------------------------------------------- inside a tiny LLaVA --
def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("amount", [dict(keep=5), dict(ratio=0.6)])
def test_dart_inside_tiny_llava(layer, amount):
    """apply_compression(method="dart") keeps what the reference keeps from keys and hidden states recomputed from
    the unpatched model (output_hidden_states, layer K-1's k_proj and RoPE by hand)."""
    pytest.importorskip("transformers")
    from epic_ext.models import apply_compression
    from epic_ext.models.tiny import build_tiny_llava
    from helpers.llava_data import make_llava_batch

    model = build_tiny_llava(seed=0)
    layouts = [[3, "img", 6], [2, "img", 3, "img", 4], [8], [5, "img", 2]]  # two images; text-only; 2 text after
    batch = make_llava_batch(model, layouts, padding="right", seed=3)
    lm = model.model.language_model
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states  # [0] = embeddings
        previous = lm.layers[layer - 1]
        x = previous.input_layernorm(states[layer - 1])
        batch_size, length = x.shape[:2]
        cfg = lm.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        key = previous.self_attn.k_proj(x).view(batch_size, length, -1, head_dim).transpose(1, 2)
        position_ids = torch.arange(length)[None].expand(batch_size, length)
        cos, sin = lm.rotary_emb(x, position_ids=position_ids)
        key = key * cos[:, None] + _rotate_half(key) * sin[:, None]
    image = batch["input_ids"] == model.config.image_token_id
    real = batch["attention_mask"].bool()
    n_visual = image.sum(1).tolist()
    keep = [0 if n == 0 else amount["keep"] if "keep" in amount else math.floor((1 - amount["ratio"]) * n + 0.5)
            for n in n_visual]
    assert len(set(k for k in keep if k)) == (2 if "ratio" in amount else 1)
    expected = reference_dart(states[layer], key, lm.norm.weight.double().tolist(), lm.norm.variance_epsilon,
                              image, real, keep, image_pivots=4, text_pivots=4)
    handle = apply_compression(model, "dart", layer=layer, **amount)
    try:
        with torch.no_grad():
            kept = model(**batch).kept_positions
    finally:
        handle.remove()
    for b in range(batch_size):
        positions = kept[b][kept[b] >= 0]
        assert positions[image[b, positions]].tolist() == expected[b], f"sample {b}"
