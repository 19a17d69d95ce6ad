"""apply_compression on a tiny LlavaForConditionalGeneration against an independent reference.

The reference runs the unpatched model with eager attention and output_attentions, ranks the visual tokens from
layer K-1's attention weights by hand, then runs the decoder layers itself on the FULL sequence with a 4-D mask
that, from layer K on, hides the dropped keys. Logits at the kept positions must equal the patched model's
(pruned sequence, SDPA, gathered positions).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from epic_ext.models import _hf, apply_compression  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava  # noqa: E402
from helpers.attn_cases import ATTN_CASES, AttnCase  # noqa: E402
from helpers.flash_standin import flash_standin, use_flash  # noqa: E402
from helpers.llava_data import make_llava_batch  # noqa: E402

LAYOUTS = [[3, "img", 6], [5, "img", 2], [2, "img", 9]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llava(seed=0)


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation({"text_config": "eager"})
    return ref


def reference_fastv(model, batch, layer, keep):
    """Returns (logits [B, L, V] of the masked full-length forward, kept visual positions per sample)."""
    ref = eager_copy(model)
    lm = ref.model.language_model
    captured = {}
    hook = lm.register_forward_pre_hook(lambda mod, args, kwargs: captured.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        out = ref(**batch, output_attentions=True)
    hook.remove()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    image = ids == model.config.image_token_id
    batch_size, length = ids.shape
    kept_visual = torch.zeros_like(image)
    for b in range(batch_size):
        last = int(mask[b].nonzero().max())
        importance = out.attentions[max(layer - 1, 0)][b, :, last, :].double().mean(0)  # K=0: layer 0 itself
        candidates = image[b].nonzero().flatten()
        order = torch.sort(-importance[candidates], stable=True).indices[:keep]
        kept_visual[b, candidates[order]] = True
    keep_key = ~image | kept_visual
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed_full = causal[None] & mask[:, None, :]
    allowed_pruned = allowed_full & keep_key[:, None, :]
    minimum = torch.finfo(torch.float32).min
    positions = torch.arange(length)[None].expand(batch_size, length)
    with torch.no_grad():
        hidden = captured["inputs_embeds"]
        cos_sin = lm.rotary_emb(hidden, positions)
        for i, decoder_layer in enumerate(lm.layers):
            allowed = allowed_full if i < layer else allowed_pruned
            additive = torch.where(allowed, 0.0, minimum)[:, None]
            hidden = decoder_layer(hidden, attention_mask=additive, position_embeddings=cos_sin, position_ids=positions)
        logits = ref.lm_head(lm.norm(hidden))
    return logits, kept_visual


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("layer, keep", [(2, 4), (1, 7), (3, 1), (0, 5)])
def test_fastv_matches_masked_eager_reference(model, padding, layer, keep):
    batch = make_llava_batch(model, LAYOUTS, padding=padding, seed=layer * 10 + keep)
    expected_logits, expected_kept = reference_fastv(model, batch, layer, keep)
    handle = apply_compression(model, "fastv", layer=layer, keep=keep)
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        handle.remove()
    kept = out.kept_positions
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image = ids == model.config.image_token_id
    for b in range(ids.shape[0]):
        slots = kept[b] >= 0
        positions = kept[b][slots]
        assert torch.all(positions[1:] > positions[:-1]), "kept positions sorted and unique"
        kept_visual = positions[image[b, positions]]
        assert kept_visual.tolist() == expected_kept[b].nonzero().flatten().tolist()
        real = mask[b, positions].bool()
        got = out.logits[b][slots][real]
        want = expected_logits[b, positions][real]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the pruned length: every text/pad token plus `keep` visual tokens per sample
    assert out.logits.shape[1] == ids.shape[1] - (16 - keep)


@pytest.mark.parametrize("attn", ATTN_CASES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_fastv_under_each_attention_matches_masked_eager_reference(model, attn, padding, monkeypatch):
    """The scoring capture and the pruned masks under eager and flash attention (helpers.attn_cases)."""
    layer, keep = 2, 4
    batch = make_llava_batch(model, LAYOUTS, padding=padding, seed=17)
    expected_logits, expected_kept = reference_fastv(model, batch, layer, keep)
    case = AttnCase(attn, monkeypatch)
    out = case.run(model, batch, lambda variant, inputs: compressed_forward(variant, inputs, layer=layer, keep=keep))
    image = batch["input_ids"] == model.config.image_token_id
    for b in range(len(LAYOUTS)):
        positions = out.kept_positions[b][out.kept_positions[b] >= 0]
        assert positions[image[b, positions]].tolist() == expected_kept[b].nonzero().flatten().tolist(), b
    case.assert_rows(out, batch["attention_mask"], expected_logits)


def test_batched_generate_under_flash_equals_per_sample_and_sdpa(model, monkeypatch):
    """Left-padded batched generation on the pruned cache through transformers' flash_attention_2 path (pure-torch
    kernels, helpers.flash_standin): each row equals the sample alone, and the SDPA model's tokens."""
    layouts = [[3, "img", 6], [5, "img", 2], [7, "img", 9]]
    batch = make_llava_batch(model, layouts, padding="left", seed=5)
    flash = copy.deepcopy(model)
    use_flash(flash)
    with flash_standin(monkeypatch):
        handle = apply_compression(flash, "fastv", layer=2, keep=5)
        try:
            with torch.no_grad():
                batched = flash.generate(**batch, max_new_tokens=6, do_sample=False)
                for b in range(len(layouts)):
                    real = batch["attention_mask"][b].bool()
                    one = flash.generate(input_ids=batch["input_ids"][b, real][None],
                                         attention_mask=torch.ones(1, int(real.sum()), dtype=torch.long),
                                         pixel_values=batch["pixel_values"][b: b + 1], max_new_tokens=6,
                                         do_sample=False)
                    assert torch.equal(batched[b, -6:], one[0, -6:]), f"sample {b}"
        finally:
            handle.remove()
    handle = apply_compression(model, "fastv", layer=2, keep=5)
    try:
        with torch.no_grad():
            assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), batched)
    finally:
        handle.remove()


def test_ratio_zero_and_remove_reproduce_unpatched(model):
    batch = make_llava_batch(model, LAYOUTS, padding="left", seed=1)
    with torch.no_grad():
        expected = model(**batch).logits
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    with torch.no_grad():
        pruned = model(**batch).logits
        with handle.override(ratio=0.0):
            same = model(**batch).logits
    handle.remove()
    with torch.no_grad():
        after = model(**batch).logits
    assert pruned.shape[1] < expected.shape[1]
    assert torch.equal(same, expected)
    assert torch.equal(after, expected)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "forward" not in model.model.language_model.__dict__


@pytest.mark.parametrize("method, kwargs", [("dart", {}), ("dart", {"image_pivots": 2, "text_pivots": 0}),
                                            ("random", {"generator": torch.Generator().manual_seed(3)}),
                                            ("fastv", {"query": "prompt"})])
@pytest.mark.parametrize("keep", [1, 5, 16])
@pytest.mark.parametrize("layer", [0, 2])
def test_methods_keep_exactly_keep_inside_spans(model, method, kwargs, keep, layer):
    layouts = [[3, "img", 6], [2, "img", 3, "img", 4], [8], [5, "img", 2]]  # two images, and a text-only sample
    batch = make_llava_batch(model, layouts, padding="right", seed=keep)
    handle = apply_compression(model, method, layer=layer, keep=keep, **kwargs)
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        handle.remove()
    ids = batch["input_ids"]
    image = ids == model.config.image_token_id
    n_images = [0, 0, 0, 0]
    for b, layout in enumerate(layouts):
        n_images[b] = layout.count("img")
    kept = out.kept_positions
    for b in range(ids.shape[0]):
        positions = kept[b][kept[b] >= 0]
        assert torch.all(positions[1:] > positions[:-1])
        visual = image[b, positions]
        assert int(visual.sum()) == (keep if n_images[b] else 0)
        text = (~image[b]).nonzero().flatten()
        assert set(text.tolist()) <= set(positions.tolist()), "text tokens are never dropped"


def test_random_is_reproducible_with_generator(model):
    batch = make_llava_batch(model, LAYOUTS, seed=4)
    results = []
    for _ in range(2):
        handle = apply_compression(model, "random", layer=0, keep=5, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            results.append(model(**batch).kept_positions)
        handle.remove()
    assert torch.equal(results[0], results[1])


def test_batched_generate_equals_per_sample(model):
    layouts = [[3, "img", 6], [5, "img", 2], [7, "img", 9]]
    batch = make_llava_batch(model, layouts, padding="left", seed=5)
    handle = apply_compression(model, "fastv", layer=2, keep=5)
    try:
        with torch.no_grad():
            batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
            for b in range(len(layouts)):
                single = make_llava_batch(model, [layouts[b]], seed=5)
                real = batch["attention_mask"][b].bool()
                single["input_ids"] = batch["input_ids"][b, real][None]
                single["attention_mask"] = torch.ones_like(single["input_ids"])
                single["pixel_values"] = batch["pixel_values"][b: b + 1]
                one = model.generate(**single, max_new_tokens=6, do_sample=False)
                assert torch.equal(batched[b, -6:], one[0, -6:]), f"sample {b}"
    finally:
        handle.remove()


def test_labels_loss_on_pruned_logits(model):
    batch = make_llava_batch(model, LAYOUTS, padding="right", seed=6)
    labels = batch["input_ids"].clone()
    labels[:, :-4] = -100  # supervise the last tokens only
    labels[batch["attention_mask"] == 0] = -100
    out = compressed_forward(model, batch, keep=4, forward_kwargs={"labels": labels})
    kept = out.kept_positions
    logits = out.logits
    losses, count = 0.0, 0
    for b in range(labels.shape[0]):
        for slot, position in enumerate(kept[b].tolist()):
            if position < 0 or position + 1 >= labels.shape[1] or labels[b, position + 1] == -100:
                continue
            losses += torch.nn.functional.cross_entropy(logits[b, slot][None], labels[b, position + 1][None]).item()
            count += 1
    assert count > 0
    assert abs(out.loss.item() - losses / count) < 1e-5


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_matches(use_reentrant):
    model = build_tiny_llava(seed=1)
    model.train()
    batch = make_llava_batch(model, LAYOUTS, padding="left", seed=7)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            _hf.enable_activation_checkpointing(model, use_reentrant=use_reentrant)
        handle = apply_compression(model, "fastv", layer=2, keep=6)
        model.zero_grad()
        out = model(**batch, labels=labels)
        out.loss.backward()
        handle.remove()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    _hf.disable_activation_checkpointing(model)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="dart", layer=-1, keep=4), "layer must be an int in"),
        (dict(method="fastv", layer=4, keep=4), "layer must be an int in"),
        (dict(method="random", layer=-1, keep=4), "layer must be an int in"),
        (dict(method="fastv", layer=2, ratio=1.0), r"ratio must be a number in \[0, 1\)"),
        (dict(method="fastv", layer=2, ratio=-0.1), r"ratio must be a number in \[0, 1\)"),
        (dict(method="fastv", layer=2, ratio=0.5, keep=3), "ratio or keep, not both"),
        (dict(method="nope", layer=2, keep=3), "unknown compression method 'nope'"),
        (dict(method="dart", layer=2, keep=3, pivots=2), "dart: bad method arguments"),
    ],
)
def test_bad_settings(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        apply_compression(model, **kwargs)
    assert getattr(model, "_epic_ext_handle", None) is None


def test_keep_more_than_visual_tokens(model):
    batch = make_llava_batch(model, LAYOUTS, seed=8)
    handle = apply_compression(model, "fastv", layer=2, keep=17)
    try:
        with pytest.raises(ValueError, match="keep=17 is more than the 16 visual tokens"):
            with torch.no_grad():
                model(**batch)
    finally:
        handle.remove()


def test_model_without_image_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(ValueError, match="expected a LLaVA model"):
        apply_compression(llama, "fastv", layer=1, keep=2)


def test_double_patch_is_an_error(model):
    handle = apply_compression(model, "fastv", layer=2, keep=4)
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            apply_compression(model, "fastv", layer=2, keep=4)
    finally:
        handle.remove()


# ---- transformers compatibility (issue: 5.24 renamed the cache keyword and cached generate broke silently) ----
def _cache_of(out):
    return _hf.output_cache(out)


def compressed_forward(model, batch, method="fastv", layer=2, forward_kwargs=None, **amount):
    """One no-grad forward with compression applied, then removed."""
    handle = apply_compression(model, method, layer=layer, **amount)
    try:
        with torch.no_grad():
            return model(**batch, **(forward_kwargs or {}))
    finally:
        handle.remove()


@pytest.mark.parametrize("layer, keep", [(2, 5), (1, 16), (0, 3)])
def test_cache_holds_full_keys_below_k_and_pruned_keys_from_k(model, layer, keep):
    layouts = [[3, "img", 6], [25, "img", 2], [1, "img", 30], [12]]  # lengths differ by 20+, a text-only sample
    batch = make_llava_batch(model, layouts, padding="left", seed=11)
    out = compressed_forward(model, batch, layer=layer, keep=keep, forward_kwargs={"use_cache": True})
    cache = _cache_of(out)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    kept = out.kept_positions
    n_layers = model.config.text_config.num_hidden_layers
    kv_heads = model.config.text_config.num_key_value_heads
    assert len(cache.layers) == n_layers
    for i, cache_layer in enumerate(cache.layers):
        assert cache_layer.keys is not None and cache_layer.values is not None, f"layer {i} wrote no KV cache"
        want = length if i < layer else kept.shape[1]
        assert cache_layer.keys.shape[:3] == (len(layouts), kv_heads, want), f"layer {i}"
        assert cache_layer.values.shape[:3] == (len(layouts), kv_heads, want), f"layer {i}"
    for b, layout in enumerate(layouts):
        real = int(mask[b].sum())
        n_visual = 16 * layout.count("img")
        real_slots = int(((kept[b] >= 0) & mask[b].gather(0, kept[b].clamp(min=0)).bool()).sum())
        assert real_slots == real - n_visual + (keep if n_visual else 0), f"sample {b}"


def test_cache_written_at_ratio_zero_batch_one(model):
    batch = make_llava_batch(model, [[3, "img", 6]], seed=12)
    out = compressed_forward(model, batch, ratio=0.0, forward_kwargs={"use_cache": True})
    length = batch["input_ids"].shape[1]
    for i, cache_layer in enumerate(_cache_of(out).layers):
        assert cache_layer.keys is not None and cache_layer.keys.shape[2] == length, f"layer {i}"
    assert torch.equal(out.kept_positions, torch.arange(length)[None])


def _alone(batch, b):
    real = batch["attention_mask"][b].bool()
    ids = batch["input_ids"][b, real][None]
    return real, dict(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_heavily_left_padded_sample_keeps_and_generates_as_alone(model, method):
    layouts = [[2, "img", 1], [30, "img", 12], [4, "img", 3]]  # 19, 58 and 23 tokens: 39 and 35 pads
    batch = make_llava_batch(model, layouts, padding="left", seed=13)
    image_index = [0, 1, 2]  # one image per sample, in order
    # positions counted from each sample's first real token, as generate() does: DART's key norms are post-RoPE
    position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    handle = apply_compression(model, method, layer=2, keep=4)
    try:
        with torch.no_grad():
            batched_kept = model(**batch, position_ids=position_ids).kept_positions
            batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
            for b in range(len(layouts)):
                real, single = _alone(batch, b)
                single["pixel_values"] = batch["pixel_values"][image_index[b]: image_index[b] + 1]
                offset = int((~real).sum())  # left pads before the sample
                kept_alone = model(**single).kept_positions[0]
                kept_batched = batched_kept[b][batched_kept[b] >= offset] - offset
                assert kept_batched.tolist() == kept_alone.tolist(), f"sample {b} keeps other tokens in the batch"
                one = model.generate(**single, max_new_tokens=6, do_sample=False)
                assert torch.equal(batched[b, -6:], one[0, -6:]), f"sample {b} generates differently in the batch"
    finally:
        handle.remove()


@pytest.mark.parametrize("method, layer", [("fastv", 2), ("dart", 1), ("fastv", 0)])
def test_cached_generate_equals_uncached_generate(model, method, layer):
    batch = make_llava_batch(model, [[4, "img", 7]], seed=14)
    handle = apply_compression(model, method, layer=layer, keep=5)
    try:
        with torch.no_grad():
            cached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
            uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    finally:
        handle.remove()
    assert torch.equal(cached, uncached)


def test_static_cache_is_refused(model):
    batch = make_llava_batch(model, [[4, "img", 7]], seed=15)
    handle = apply_compression(model, "fastv", layer=2, keep=5)
    try:
        with pytest.raises(NotImplementedError, match="does not support StaticCache"):
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")
    finally:
        handle.remove()


def test_no_deprecation_warnings_from_our_calls(model, caplog):
    import warnings  # noqa: PLC0415

    batch = make_llava_batch(model, LAYOUTS, padding="left", seed=16)
    handle = apply_compression(model, "fastv", layer=2, keep=5)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = model(**batch, use_cache=True)
            _cache_of(out)
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    messages = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    messages += [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert not messages, messages


def test_amount_is_required(model):
    with pytest.raises(ValueError, match="give ratio .* or keep"):
        apply_compression(model, "fastv", layer=2)
    assert getattr(model, "_epic_ext_handle", None) is None


@pytest.mark.parametrize("settings", [dict(keep=16), dict(ratio=0.0)])
def test_kept_positions_on_every_patched_forward(model, settings):
    layouts = [[3, "img", 6], [8]]
    batch = make_llava_batch(model, layouts, padding="left", seed=17)
    handle = apply_compression(model, "fastv", layer=2, **settings)
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            next_mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
            step = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=next_mask, use_cache=True,
                         **_hf.cache_kwargs(_cache_of(out)))
    finally:
        handle.remove()
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.kept_positions, torch.arange(length).expand(2, length))
    assert torch.equal(step.kept_positions, torch.full((2, 1), length))


def test_version_outside_tested_range_warns_once(model, monkeypatch, caplog):
    monkeypatch.setattr(_hf, "version", lambda: "99.0.0")
    monkeypatch.setattr(_hf, "_warned_version", False)
    with caplog.at_level("WARNING", logger="epic_ext.models"):
        for _ in range(2):
            apply_compression(model, "fastv", layer=2, keep=4).remove()
    warnings_seen = [r.getMessage() for r in caplog.records if "99.0.0" in r.getMessage()]
    assert len(warnings_seen) == 1 and _hf.SUPPORTED_RANGE in warnings_seen[0]


def test_only_the_compat_module_touches_transformers_internals():
    import pathlib  # noqa: PLC0415
    import re  # noqa: PLC0415

    import epic_ext  # noqa: PLC0415

    package = pathlib.Path(epic_ext.__file__).parent
    internal = re.compile(r"^\s*(from|import)\s+transformers\.(?!__)\w+", re.M)
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "_hf.py" and internal.search(p.read_text())]
    assert not offenders, f"transformers internals imported outside models/_hf.py: {offenders}"


def test_fastv_importance_of_a_padded_sample_equals_its_importance_alone(model):
    """Pad keys get no attention in the model, so they must get no share of the importance either: the ranking
    of a heavily left-padded sample then equals the ranking of the same prompt alone (kept sets above only show a
    difference now and then, the scores always do)."""
    from epic_ext.compress import FastV, register_compressor  # noqa: PLC0415

    seen = []

    class RecordingFastV(FastV):
        def select(self, ctx):
            seen.append(ctx.importance.clone())
            return super().select(ctx)

    register_compressor("test_recording_fastv", RecordingFastV)
    layouts = [[2, "img", 1], [30, "img", 12]]
    batch = make_llava_batch(model, layouts, padding="left", seed=18)
    position_ids = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    handle = apply_compression(model, "test_recording_fastv", layer=2, keep=4)
    try:
        with torch.no_grad():
            model(**batch, position_ids=position_ids)
            real, single = _alone(batch, 0)
            model(**single, pixel_values=batch["pixel_values"][:1])
    finally:
        handle.remove()
    batched, alone = seen[0][0, real], seen[1][0]
    assert float(alone.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_supported_range_is_declared_consistently():
    import pathlib  # noqa: PLC0415
    import tomllib  # noqa: PLC0415

    root = pathlib.Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for extra in ("hf", "train"):
        assert f"transformers{_hf.SUPPORTED_RANGE}" in project["optional-dependencies"][extra], extra
    pins = [line.strip() for line in (root / "constraints.txt").read_text().splitlines()
            if line.startswith("transformers==")]
    assert pins == [f"transformers=={_hf.MAX_TESTED_VERSION}"], "make test must run the newest tested release"
    assert f"transformers {_hf.MIN_VERSION[:4]}" in (root / "README.md").read_text()


def test_decoding_after_pruning_at_layer_zero_continues_original_positions(model):
    """At K = 0 cache layer 0 is pruned too, so its length is not the original one: a decoding step given no
    position ids must still continue from the unpruned sequence's next position."""
    batch = make_llava_batch(model, [[3, "img", 6]], seed=19)
    length = batch["input_ids"].shape[1]
    handle = apply_compression(model, "fastv", layer=0, keep=4)
    try:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            assert _hf.cache_length(_cache_of(out)) < length  # layer 0 is pruned too at K = 0
            assert handle.unpruned_cache_length(_cache_of(out)) == length
            token = out.logits[:, -1:].argmax(-1)
            implicit = model(input_ids=token, use_cache=True, **_hf.cache_kwargs(_cache_of(out)))
            out = model(**batch, use_cache=True)
            explicit = model(input_ids=token, use_cache=True, position_ids=torch.tensor([[length]]),
                             **_hf.cache_kwargs(_cache_of(out)))
    finally:
        handle.remove()
    assert torch.equal(implicit.kept_positions, torch.tensor([[length]]))
    torch.testing.assert_close(implicit.logits, explicit.logits, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 2])
def test_layers_after_pruning_get_no_gapped_position_ids(model, layer):
    """Flash attention reads the position ids a decoder layer receives: a batch of one whose ids have gaps is taken
    for packed sequences (transformers' _is_packed_sequence) and attends within each run of consecutive ids. The
    kept tokens' positions have gaps, so layers from K on must not receive them (RoPE comes from the position
    embeddings). Checked with the packed-sequence test itself on what every layer gets, prefill and decode."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    batch = make_llava_batch(model, [[3, "img", 6]], seed=23)
    received: dict[int, list] = {}
    hooks = [decoder_layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: received.setdefault(i, []).append(kwargs.get("position_ids")),
        with_kwargs=True) for i, decoder_layer in enumerate(model.model.language_model.layers)]
    handle = apply_compression(model, "fastv", layer=layer, keep=5)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
        for hook in hooks:
            hook.remove()
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    for i, calls in received.items():
        assert len(calls) == 3  # prefill + two decoding steps
        for ids in calls:
            assert not (ids is not None and _is_packed_sequence(ids, 1)), f"layer {i} gets gapped ids {ids}"
    assert all(ids is None for i, calls in received.items() if i >= layer for ids in calls[:1])
