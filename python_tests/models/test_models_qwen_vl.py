"""apply_compression on tiny Qwen2.5-VL and Qwen3-VL models against an independent reference.

The reference runs the unpatched model with eager attention (FastV's ranking by hand from its attention weights),
then runs the decoder layers itself on the FULL sequence, every token at the 3-D M-RoPE position the model computed,
with a 4-D mask that hides the dropped visual tokens' keys from layer K on, adding Qwen3-VL's deepstack levels to
every visual token (dropped ones included: they are invisible from layer K on). The logits of the kept rows must
equal the patched model's (pruned sequence, SDPA, gathered positions, gathered deepstack rows). Generation is checked
against a greedy decode of the same reference, whose new tokens get the positions `get_rope_index` gives the
unpruned sequence.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from epic_ext.models import _hf, apply_compression, supported_classes  # noqa: E402
from epic_ext.models.tiny import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl  # noqa: E402
from helpers.attn_cases import ATTN_CASES, AttnCase  # noqa: E402
from helpers.dart_reference import reference_dart  # noqa: E402
from helpers.qwen_data import make_qwen_batch  # noqa: E402
from helpers.qwen_reference import Reference, eager_copy, kept_key_of, masked_reference, visual_mask  # noqa: E402,F401

BUILDERS = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl}
# Different image sizes (6, 2 + 4, 0, 0 image tokens), two images and a video in one sample, a text-only sample and a
# video-only sample: visual tokens per sample 6, 10, 0, 8 (a video of 2 x 2 x 4 patches has 4 tokens).
MIXED = [[3, ("img", 4, 6), 5], [2, ("img", 2, 4), 3, ("img", 4, 4), 2, ("vid", 2, 2, 4), 1], [7],
         [2, ("vid", 2, 4, 4), 3]]
VISUAL_COUNTS = [6, 10, 0, 8]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param](seed=0)


def fastv_kept(model, batch, layer, keep, attentions):
    """[B, L] bool: the `keep` visual tokens with the most attention from the last real token at layer K-1 (layer 0
    itself at K = 0), mean over heads, ties to the lower position."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual = visual_mask(model, ids)
    kept = torch.zeros_like(visual)
    for b in range(ids.shape[0]):
        if not visual[b].any():
            continue
        last = int(mask[b].nonzero().max())
        importance = attentions[max(layer - 1, 0)][b, :, last, :].double().mean(0)
        candidates = visual[b].nonzero().flatten()
        order = torch.sort(-importance[candidates], stable=True).indices[:keep]
        kept[b, candidates[order]] = True
    return kept


def dart_kept(model, batch, reference, layer, counts):
    """[B, L] bool: DART's kept visual tokens by the per-sample fp64 reference of test_compress_dart (image_pivots=4,
    text_pivots=4), from layer K-1's post-RoPE keys recomputed by hand and layer K's input (layer K-1's output with
    its deepstack level)."""
    visual = visual_mask(model, batch["input_ids"])
    norm = reference.lm.norm
    lists = reference_dart(reference.layer_inputs[layer], reference.post_rope_keys(layer - 1),
                           norm.weight.double().tolist(), norm.variance_epsilon, visual,
                           batch["attention_mask"].bool(), counts, image_pivots=4, text_pivots=4)
    kept = torch.zeros_like(visual)
    for b, positions in enumerate(lists):
        kept[b, positions] = True
    return kept


def compressed(model, batch, method="fastv", layer=2, call=None, **amount):
    handle = apply_compression(model, method, layer=layer, **amount)
    try:
        with torch.no_grad():
            return (call or (lambda: model(**batch)))()
    finally:
        handle.remove()


def assert_rows_match(out, batch, reference_logits):
    kept, mask = out.kept_positions, batch["attention_mask"]
    for b in range(kept.shape[0]):
        slots = kept[b] >= 0
        positions = kept[b][slots]
        assert torch.all(positions[1:] > positions[:-1]), "kept positions sorted and unique"
        real = mask[b, positions].bool()
        torch.testing.assert_close(out.logits[b][slots][real], reference_logits[b, positions][real],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("layer, keep", [(2, 3), (1, 5), (0, 2), (3, 1)])
def test_fastv_matches_masked_eager_reference(model, padding, layer, keep):
    # Qwen3-VL's three deepstack levels are added after layers 0, 1, 2: K = 0..3 prunes before, between and after them.
    batch = make_qwen_batch(model, MIXED, padding=padding, seed=layer * 10 + keep)
    full = masked_reference(model, batch, layer, torch.ones_like(batch["attention_mask"], dtype=torch.bool))
    expected_kept = fastv_kept(model, batch, layer, keep, full.attentions)
    keep_key = ~visual_mask(model, batch["input_ids"]) | expected_kept
    expected_logits = masked_reference(model, batch, layer, keep_key).logits
    out = compressed(model, batch, "fastv", layer=layer, keep=keep)
    visual = visual_mask(model, batch["input_ids"])
    for b in range(len(MIXED)):
        positions = out.kept_positions[b][out.kept_positions[b] >= 0]
        assert positions[visual[b, positions]].tolist() == expected_kept[b].nonzero().flatten().tolist(), b
    assert_rows_match(out, batch, expected_logits)
    # the pruned length: the longest sample after dropping (the text-only sample: all of it)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - min(n - min(n, keep) for n in VISUAL_COUNTS)


@pytest.mark.parametrize("attn", ATTN_CASES)
def test_fastv_under_each_attention_matches_masked_eager_reference(model, attn, monkeypatch):
    """Scoring and pruning under eager and flash attention (helpers.attn_cases); right padding, a text-only and a
    video sample in the batch."""
    layer, keep = 2, 3
    batch = make_qwen_batch(model, MIXED, padding="right", seed=23)
    full = masked_reference(model, batch, layer, torch.ones_like(batch["attention_mask"], dtype=torch.bool))
    expected_kept = fastv_kept(model, batch, layer, keep, full.attentions)
    visual = visual_mask(model, batch["input_ids"])
    expected_logits = masked_reference(model, batch, layer, ~visual | expected_kept).logits
    case = AttnCase(attn, monkeypatch)
    out = case.run(model, batch, lambda variant, inputs: compressed(variant, inputs, "fastv", layer=layer, keep=keep))
    for b in range(len(MIXED)):
        positions = out.kept_positions[b][out.kept_positions[b] >= 0]
        assert positions[visual[b, positions]].tolist() == expected_kept[b].nonzero().flatten().tolist(), b
    case.assert_rows(out, batch["attention_mask"], expected_logits)


@pytest.mark.parametrize("method, kwargs", [("dart", {}), ("random", {"generator": 3})])
@pytest.mark.parametrize("amount", [{"keep": 4}, {"ratio": 0.5}])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("layer", [1, 3])
def test_methods_match_masked_reference(model, method, kwargs, amount, padding, layer):
    """DART (its kept set ranked by the fp64 per-sample reference) and Random (the kept set the patched forward
    reports): every kept row's logits equal the reference with that set, text is never dropped, and each sample
    keeps `keep` (or round((1 - ratio) * n)) of ALL its visual tokens, images and video together."""
    if "generator" in kwargs:
        kwargs = {"generator": torch.Generator().manual_seed(kwargs["generator"])}
    batch = make_qwen_batch(model, MIXED, padding=padding, seed=5 + layer)
    counts = [0 if n == 0 else amount.get("keep", int((1 - amount.get("ratio", 0)) * n + 0.5)) for n in VISUAL_COUNTS]
    out = compressed(model, batch, method, layer=layer, **amount, **kwargs)
    visual = visual_mask(model, batch["input_ids"])
    real = batch["attention_mask"].bool()
    for b, n in enumerate(VISUAL_COUNTS):
        assert int(visual[b].sum()) == n
        positions = out.kept_positions[b][out.kept_positions[b] >= 0]
        assert int(visual[b, positions].sum()) == counts[b], b
        assert set((real[b] & ~visual[b]).nonzero().flatten().tolist()) <= set(positions.tolist())
    keep_key = kept_key_of(model, batch["input_ids"], out.kept_positions)
    if method == "dart":
        full = masked_reference(model, batch, layer, torch.ones_like(keep_key))
        assert torch.equal(keep_key & visual, dart_kept(model, batch, full, layer, counts))
    assert_rows_match(out, batch, masked_reference(model, batch, layer, keep_key).logits)


def test_ratio_zero_and_remove_reproduce_unpatched(model):
    batch = make_qwen_batch(model, [MIXED[0], MIXED[1], MIXED[3]], padding="left", seed=1)
    with torch.no_grad():
        expected = model(**batch).logits
        expected_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    with torch.no_grad():
        pruned = model(**batch).logits
        with handle.override(ratio=0.0):
            same = model(**batch).logits
            same_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    handle.remove()
    with torch.no_grad():
        after = model(**batch).logits
    assert pruned.shape[1] < expected.shape[1]
    assert torch.equal(same, expected)
    assert torch.equal(same_tokens, expected_tokens)
    assert torch.equal(after, expected)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "forward" not in model.model.language_model.__dict__


def test_text_only_batch_is_the_unpatched_computation(model):
    batch = make_qwen_batch(model, [[9], [4]], padding="left", seed=2)
    with torch.no_grad():
        expected = model(**batch).logits
    out = compressed(model, batch, "dart", layer=1, keep=2)
    assert torch.equal(out.logits, expected)


def _alone(model, layouts, b, seed):
    return make_qwen_batch(model, [layouts[b]], seed=seed, sample_ids=[b])


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_batched_generate_equals_per_sample(model, method):
    layouts = [[3, ("img", 4, 6), 5], [2, ("img", 2, 4), 3, ("vid", 2, 4, 4), 1], [6, ("img", 4, 4), 2], [5]]
    batch = make_qwen_batch(model, layouts, padding="left", seed=3)
    handle = apply_compression(model, method, layer=2, keep=3)
    try:
        settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            batched = model.generate(**batch, **settings)
            for b in range(len(layouts)):
                one = model.generate(**_alone(model, layouts, b, 3), **settings)
                assert torch.equal(batched.sequences[b, -6:], one.sequences[0, -6:]), f"sample {b}"
                for step_batched, step_one in zip(batched.logits, one.logits):
                    torch.testing.assert_close(step_batched[b], step_one[0], rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_cached_generate_equals_uncached_generate(model, method):
    """generate(use_cache=False) runs the whole sequence (vision included) at every step and ranks with the prompt's
    last token, so it keeps the tokens cached generation keeps and decodes the same, logits included."""
    layouts = [[3, ("img", 4, 6), 5], [2, ("img", 2, 4), 3, ("vid", 2, 4, 4), 1]]
    batch = make_qwen_batch(model, layouts, padding="left", seed=9)
    handle = apply_compression(model, method, layer=2, keep=3)
    try:
        with torch.no_grad():
            settings = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
            cached = model.generate(**batch, **settings)
            uncached = model.generate(**batch, **settings, use_cache=False)
    finally:
        handle.remove()
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-5, atol=1e-5)


def _reference_greedy(model, single, layer, keep_key, steps):
    """Greedy decoding with the masked full-sequence reference: per step, the whole sequence again, the new tokens
    at the positions get_rope_index gives the unpruned sequence. Returns (tokens, last-row logits per step)."""
    single = dict(single)
    tokens, logits = [], []
    for _ in range(steps):
        step_logits = masked_reference(model, single, layer, keep_key).logits
        next_token = step_logits[0, -1].argmax()
        tokens.append(int(next_token))
        logits.append(step_logits[0, -1])
        single["input_ids"] = torch.cat([single["input_ids"], next_token.view(1, 1)], dim=1)
        single["attention_mask"] = torch.ones_like(single["input_ids"])
        single["mm_token_type_ids"] = torch.cat([single["mm_token_type_ids"],
                                                 single["mm_token_type_ids"].new_zeros(1, 1)], dim=1)
        keep_key = torch.cat([keep_key, keep_key.new_ones(1, 1)], dim=1)
    return tokens, logits


@pytest.mark.parametrize("layer", [2, 0])
def test_generate_decodes_at_unpruned_positions(model, layer):
    """After a pruned prefill, each decoded token's logits equal the reference's: the new tokens continue from the
    unpruned sequence's next M-RoPE position (rope_deltas), not from the pruned length."""
    layouts = [[3, ("img", 4, 6), 5], [2, ("img", 2, 4), 3, ("vid", 2, 4, 4), 1]]
    batch = make_qwen_batch(model, layouts, padding="left", seed=4)
    steps = 5
    handle = apply_compression(model, "fastv", layer=layer, keep=3)
    try:
        with torch.no_grad():
            kept = model(**batch).kept_positions
            generated = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
    finally:
        handle.remove()
    length = batch["input_ids"].shape[1]
    for b in range(len(layouts)):
        real = batch["attention_mask"][b].bool()
        keep_key = kept_key_of(model, batch["input_ids"][b: b + 1], kept[b: b + 1])[:, real]
        tokens, logits = _reference_greedy(model, _alone(model, layouts, b, 4), layer, keep_key, steps)
        assert generated.sequences[b, length:].tolist() == tokens, f"sample {b}"
        for step in range(steps):
            torch.testing.assert_close(generated.logits[step][b], logits[step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [2, 0])
def test_forward_decoding_loop_uses_unpruned_positions(model, layer):
    """A hand-written cached loop (no generate, no position_ids): the model adds rope_deltas to the cache length,
    which layer 0 (never pruned at K >= 1) keeps at the unpruned length; at K = 0 layer 0 is pruned too and the
    adapter hands the model the unpruned positions."""
    layouts = [[3, ("img", 4, 6), 5]]
    batch = make_qwen_batch(model, layouts, seed=6)
    handle = apply_compression(model, "fastv", layer=layer, keep=2)
    try:
        with torch.no_grad():
            first = model(**batch, use_cache=True)
            cache = _hf.output_cache(first)
            if layer == 0:
                assert _hf.cache_length(cache) < batch["input_ids"].shape[1], "layer 0 is pruned at K = 0"
            tokens = [int(first.logits[0, -1].argmax())]
            logits = []
            for _ in range(2):
                step = model(input_ids=torch.tensor([tokens[-1:]]), **_hf.cache_kwargs(cache))
                logits.append(step.logits[0, -1])
                tokens.append(int(step.logits[0, -1].argmax()))
    finally:
        handle.remove()
    keep_key = kept_key_of(model, batch["input_ids"], first.kept_positions)
    want_tokens, want_logits = _reference_greedy(model, batch, layer, keep_key, 3)
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_labels_loss_on_pruned_logits(model):
    batch = make_qwen_batch(model, MIXED, padding="left", seed=7)
    labels = batch["input_ids"].clone()
    labels[:, :-4] = -100  # supervise the last tokens only
    out = compressed(model, batch, "fastv", layer=2, keep=3, call=lambda: model(**batch, labels=labels))
    losses, count = 0.0, 0
    for b in range(labels.shape[0]):
        for slot, position in enumerate(out.kept_positions[b].tolist()):
            if position < 0 or position + 1 >= labels.shape[1] or labels[b, position + 1] == -100:
                continue
            losses += torch.nn.functional.cross_entropy(out.logits[b, slot][None], labels[b, position + 1][None]).item()
            count += 1
    assert count > 0
    assert abs(out.loss.item() - losses / count) < 1e-5


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_gradient_checkpointing_matches(family):
    """Training through the pruning (deepstack rows narrowed inside the autograd graph) gives the same gradients,
    vision tower included, with activation checkpointing."""
    model = BUILDERS[family](seed=1)
    model.train()
    batch = make_qwen_batch(model, MIXED, padding="left", seed=10)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            _hf.enable_activation_checkpointing(model, use_reentrant=False)
        handle = apply_compression(model, "fastv", layer=1, keep=3)
        model.zero_grad()
        out = model(**batch, labels=labels)
        out.loss.backward()
        handle.remove()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    _hf.disable_activation_checkpointing(model)
    assert grads[0].keys() == grads[1].keys()
    assert any(name.startswith("model.visual") for name in grads[0]), "the vision tower gets gradients"
    if family == "qwen3_vl":  # every deepstack level, the ones added after the pruning (layers 1, 2) included
        assert all(any(f"deepstack_merger_list.{level}." in name for name in grads[0]) for level in range(3))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_eager_and_sdpa_models_prune_alike(model):
    """The scoring capture inside the model's own attention works with eager attention too (Qwen's modeling files
    define their own eager_attention_forward)."""
    family = "qwen3_vl" if type(model).__name__.startswith("Qwen3") else "qwen2_5_vl"
    eager = BUILDERS[family](seed=0, attn_implementation="eager")
    batch = make_qwen_batch(model, MIXED, padding="right", seed=8)
    want = compressed(model, batch, "dart", layer=1, keep=3)
    got = compressed(eager, batch, "dart", layer=1, keep=3)
    assert torch.equal(got.kept_positions, want.kept_positions)
    kept = want.kept_positions
    rows = (kept >= 0) & batch["attention_mask"].gather(1, kept.clamp(min=0)).bool()  # not the padding slots or pads
    torch.testing.assert_close(got.logits[rows], want.logits[rows], rtol=1e-5, atol=1e-5)


def test_qwen2_5_vl_sliding_window_layers_are_refused():
    model = build_tiny_qwen2_5_vl(seed=0)
    model.config.text_config.layer_types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        apply_compression(model, "fastv", layer=2, keep=2)
    assert getattr(model, "_epic_ext_handle", None) is None


def test_supported_classes_name_the_qwen_families():
    names = supported_classes()
    for name in ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", "Qwen3VLForConditionalGeneration",
                 "Qwen3VLModel"):
        assert name in names
