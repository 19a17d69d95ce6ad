"""Batches and an independent reference for the compression tests of the LLaVA-NeXT / LLaVA-OneVision families.

Batches: per sample a layout like [3, ("img", (50, 40)), 6, ("video", 3), 2] (text-token counts, images of a given
(height, width), videos of a given frame count). The number of placeholder tokens of each image comes from the
model's own feature extractor (anyres crops, newline slots), each video's from the processor's rule (frames pooled
2x2, one newline slot), so samples with different image sizes get different visual-token counts exactly as the
processor would write them.

Reference: the unpatched model with eager attention and output_attentions, run once on the full batch; FastV's
kept set is ranked by hand from layer K-1's attention weights, DART's by test_compress_dart.reference_dart from keys
and hidden states recomputed by hand; then the decoder layers are run on the FULL sequence with a 4-D mask that,
from layer K on, hides the dropped visual keys, every token keeping its original position. Logits at the kept
positions must equal the patched model's (pruned sequence, SDPA, gathered positions).
"""

from __future__ import annotations

import copy
import math

import torch

from helpers.dart_reference import reference_dart

PAD = 0
MAX_CROPS = 5  # base crop + up to 2x2 grid crops (the tiny models' pinpoints)


def _features(output) -> list[torch.Tensor] | torch.Tensor:
    """get_image_features / get_video_features return a model output (pooler_output) or, in older releases, the
    features themselves."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _visual_lengths(model, image_pixels, image_sizes, video_pixels) -> tuple[list[int], list[int]]:
    inner = model.model
    with torch.no_grad():
        images = []
        for pixels, size in zip(image_pixels, image_sizes):
            features = _features(inner.get_image_features(pixels[None], torch.tensor([size])))
            images.append(int(features[0].shape[0]))
    # A video: every frame pooled 2x2 (ceil), plus one newline slot after the last frame, as the processor writes it
    # (5.17 appends that slot in forward, 5.24 in get_video_features, so the count is not read from either).
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per_frame = math.ceil(grid / 2) ** 2
    videos = [pixels.shape[0] * per_frame + 1 for pixels in video_pixels]
    return images, videos


class MultimodalBatch:
    """A batch built from layouts; `single(b)` is sample b alone (no padding), with the same pixels."""

    def __init__(self, model, layouts, padding: str = "left", seed: int = 0):
        config = model.config
        g = torch.Generator().manual_seed(seed)
        size = config.vision_config.image_size
        self.image_token = config.image_token_id
        self.video_token = getattr(config, "video_token_id", None)
        low_id = min(t for t in (self.image_token, self.video_token) if t is not None)
        self.samples = []  # (ids, [image pixels], [image sizes], [video pixels])
        for layout in layouts:
            parts, images, sizes, videos = [], [], [], []
            for part in layout:
                if isinstance(part, int):
                    parts.append(("text", torch.randint(1, low_id - 1, (part,), generator=g).tolist()))
                elif part[0] == "img":
                    images.append(torch.randn(MAX_CROPS, 3, size, size, generator=g))
                    sizes.append(list(part[1]))
                    parts.append(("img", len(images) - 1))
                elif part[0] == "video":
                    videos.append(torch.randn(part[1], 3, size, size, generator=g))
                    parts.append(("video", len(videos) - 1))
                else:
                    raise ValueError(f"unknown layout part {part!r}")
            image_lengths, video_lengths = _visual_lengths(model, images, sizes, videos)
            ids = []
            for kind, value in parts:
                if kind == "text":
                    ids += value
                elif kind == "img":
                    ids += [self.image_token] * image_lengths[value]
                else:
                    ids += [self.video_token] * video_lengths[value]
            self.samples.append((ids, images, sizes, videos))
        self.padding = padding
        self.batch = self._collate(self.samples, padding)

    @staticmethod
    def _collate(samples, padding):
        length = max(len(s[0]) for s in samples)
        ids = torch.full((len(samples), length), PAD, dtype=torch.long)
        mask = torch.zeros(len(samples), length, dtype=torch.long)
        for b, (row, _, _, _) in enumerate(samples):
            span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row)
            mask[b, span] = 1
        batch = dict(input_ids=ids, attention_mask=mask)
        images = [p for s in samples for p in s[1]]
        if images:
            batch["pixel_values"] = torch.stack(images)
            batch["image_sizes"] = torch.tensor([z for s in samples for z in s[2]])
        videos = [v for s in samples for v in s[3]]
        if videos:
            batch["pixel_values_videos"] = torch.stack(videos)
        return batch

    def single(self, b: int) -> dict:
        return self._collate([self.samples[b]], "left")

    def visual_mask(self) -> torch.Tensor:
        ids = self.batch["input_ids"]
        mask = ids == self.image_token
        if self.video_token is not None:
            mask |= ids == self.video_token
        return mask


def keep_counts(visual: torch.Tensor, keep: int | None = None, ratio: float | None = None) -> list[int]:
    counts = visual.sum(1).tolist()
    return [0 if n == 0 else keep if keep is not None else min(n, math.floor((1 - ratio) * n + 0.5)) for n in counts]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class EagerReference:
    """The unpatched model in eager mode, run once on a batch (attentions, hidden states, layer-0 input)."""

    def __init__(self, model, batch: dict, visual: torch.Tensor):
        self.model = copy.deepcopy(model)
        self.model.set_attn_implementation({"text_config": "eager"})
        self.lm = self.model.model.language_model
        captured = {}
        hook = self.lm.register_forward_pre_hook(lambda mod, args, kwargs: captured.update(kwargs), with_kwargs=True)
        with torch.no_grad():
            out = self.model(**batch, output_attentions=True, output_hidden_states=True)
        hook.remove()
        self.inputs_embeds = captured["inputs_embeds"]
        self.attentions = out.attentions
        self.hidden_states = out.hidden_states  # [0] = embeddings
        self.mask = batch["attention_mask"].bool()
        self.visual = visual
        batch_size, length = self.mask.shape
        self.positions = torch.arange(length)[None].expand(batch_size, length)

    def fastv_kept(self, layer: int, counts: list[int]) -> torch.Tensor:
        """[B, L] bool kept visual tokens: the top counts[b] by layer K-1's attention from the last real token,
        averaged over heads (K = 0: layer 0's own), ties to the lower position."""
        kept = torch.zeros_like(self.visual)
        for b, count in enumerate(counts):
            last = int(self.mask[b].nonzero().max())
            importance = self.attentions[max(layer - 1, 0)][b, :, last, :].double().mean(0)
            candidates = self.visual[b].nonzero().flatten()
            order = torch.sort(-importance[candidates], stable=True).indices[:count]
            kept[b, candidates[order]] = True
        return kept

    def dart_kept(self, layer: int, counts: list[int]) -> torch.Tensor:
        """[B, L] bool kept visual tokens by the per-sample fp64 DART reference (image_pivots=4, text_pivots=4), from
        layer K-1's post-RoPE keys recomputed by hand and layer K-1's output."""
        with torch.no_grad():
            previous = self.lm.layers[layer - 1]
            x = previous.input_layernorm(self.hidden_states[layer - 1])
            batch_size, length = x.shape[:2]
            config = self.lm.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            key = previous.self_attn.k_proj(x).view(batch_size, length, -1, head_dim).transpose(1, 2)
            cos, sin = self.lm.rotary_emb(x, position_ids=self.positions)
            key = key * cos[:, None] + _rotate_half(key) * sin[:, None]
        lists = reference_dart(self.hidden_states[layer], key, self.lm.norm.weight.double().tolist(),
                               self.lm.norm.variance_epsilon, self.visual, self.mask, counts, image_pivots=4,
                               text_pivots=4)
        kept = torch.zeros_like(self.visual)
        for b, positions in enumerate(lists):
            kept[b, positions] = True
        return kept

    def logits(self, layer: int, kept_visual: torch.Tensor) -> torch.Tensor:
        """[B, L, V] logits of the full sequence with dropped visual keys hidden from layer `layer` on."""
        length = self.mask.shape[1]
        keep_key = ~self.visual | kept_visual
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed_full = causal[None] & self.mask[:, None, :]
        allowed_pruned = allowed_full & keep_key[:, None, :]
        minimum = torch.finfo(torch.float32).min
        with torch.no_grad():
            hidden = self.inputs_embeds
            cos_sin = self.lm.rotary_emb(hidden, self.positions)
            for i, decoder_layer in enumerate(self.lm.layers):
                allowed = allowed_full if i < layer else allowed_pruned
                additive = torch.where(allowed, 0.0, minimum)[:, None]
                hidden = decoder_layer(hidden, attention_mask=additive, position_embeddings=cos_sin,
                                       position_ids=self.positions)
            return self.model.lm_head(self.lm.norm(hidden))


def assert_matches_reference(out, reference: EagerReference, layer: int, expected_kept: torch.Tensor | None,
                             counts: list[int]) -> None:
    """The patched output keeps every text token and counts[b] visual tokens (the expected ones when given), and
    its logits at the kept real positions equal the masked reference's to 1e-5."""
    kept = out.kept_positions
    visual, mask = reference.visual, reference.mask
    kept_visual = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = kept[b][kept[b] >= 0]
        assert torch.all(positions[1:] > positions[:-1]), "kept positions sorted and unique"
        assert set((~visual[b]).nonzero().flatten().tolist()) <= set(positions.tolist()), "text is never dropped"
        kept_visual[b, positions[visual[b, positions]]] = True
        assert int(kept_visual[b].sum()) == counts[b], f"sample {b} keeps {int(kept_visual[b].sum())}"
    if expected_kept is not None:
        for b in range(visual.shape[0]):
            assert kept_visual[b].nonzero().flatten().tolist() == expected_kept[b].nonzero().flatten().tolist(), \
                f"sample {b} keeps other visual tokens than the reference"
    want_all = reference.logits(layer, kept_visual)
    for b in range(visual.shape[0]):
        slots = kept[b] >= 0
        positions = kept[b][slots]
        real = mask[b, positions]
        torch.testing.assert_close(out.logits[b][slots][real], want_all[b, positions][real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- checks shared by the families --
def check_against_reference(model, layouts, method: str, padding: str, layer: int, seed: int, attn_case=None,
                            **amount) -> None:
    """apply_compression(method) on a batch equals the masked eager reference (FastV and DART kept sets ranked
    independently; Random's kept set is checked for counts and text, then its logits).

    Args:
        attn_case: a helpers.attn_cases.AttnCase: the compressed model runs under its attention implementation
            (None: the model as it is, SDPA).
    """
    from epic_ext.models import apply_compression  # noqa: PLC0415

    data = MultimodalBatch(model, layouts, padding=padding, seed=seed)
    visual = data.visual_mask()
    counts = keep_counts(visual, **amount)
    reference = EagerReference(model, data.batch, visual)
    expected = {"fastv": lambda: reference.fastv_kept(layer, counts),
                "dart": lambda: reference.dart_kept(layer, counts),
                "random": lambda: None}[method]()
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if method == "random" else {}

    def compressed(variant, batch):
        handle = apply_compression(variant, method, layer=layer, **amount, **kwargs)
        try:
            with torch.no_grad():
                return variant(**batch)
        finally:
            handle.remove()

    assert sum(counts) < int(visual.sum()), "the setting drops visual tokens"
    if attn_case is None:
        assert_matches_reference(compressed(model, data.batch), reference, layer, expected, counts)
        return
    out = attn_case.run(model, data.batch, compressed)
    for b in range(visual.shape[0]):
        positions = out.kept_positions[b][out.kept_positions[b] >= 0]
        assert set((~visual[b]).nonzero().flatten().tolist()) <= set(positions.tolist()), "text is never dropped"
        if expected is not None:
            assert positions[visual[b, positions]].tolist() == expected[b].nonzero().flatten().tolist(), b
    kept_visual = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = out.kept_positions[b][out.kept_positions[b] >= 0]
        kept_visual[b, positions[visual[b, positions]]] = True
    attn_case.assert_rows(out, reference.mask, reference.logits(layer, kept_visual))


def check_batched_generate_equals_single(model, layouts, method: str = "fastv", layer: int = 2, seed: int = 0,
                                         new_tokens: int = 6, **amount) -> None:
    from epic_ext.models import apply_compression  # noqa: PLC0415

    data = MultimodalBatch(model, layouts, padding="left", seed=seed)
    handle = apply_compression(model, method, layer=layer, **amount)
    try:
        with torch.no_grad():
            batched = model.generate(**data.batch, max_new_tokens=new_tokens, do_sample=False)
            for b in range(len(layouts)):
                one = model.generate(**data.single(b), max_new_tokens=new_tokens, do_sample=False)
                assert torch.equal(batched[b, -new_tokens:], one[0, -new_tokens:]), f"sample {b}"
    finally:
        handle.remove()


def check_ratio_zero_and_remove(model, layouts, seed: int = 0) -> None:
    """ratio=0 is the unpatched model bit for bit; remove() restores it exactly."""
    from epic_ext.models import apply_compression  # noqa: PLC0415

    data = MultimodalBatch(model, layouts, padding="left", seed=seed)
    attn = model.config.text_config._attn_implementation
    with torch.no_grad():
        expected = model(**data.batch).logits
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    with torch.no_grad():
        pruned = model(**data.batch).kept_positions
        with handle.override(ratio=0.0):
            same = model(**data.batch).logits
    handle.remove()
    with torch.no_grad():
        after = model(**data.batch).logits
    length = expected.shape[1]
    assert not torch.equal(pruned, torch.arange(length).expand(pruned.shape[0], length)), "ratio 0.5 prunes"
    assert torch.equal(same, expected)
    assert torch.equal(after, expected)
    assert model.config.text_config._attn_implementation == attn
    assert "forward" not in model.model.language_model.__dict__
    assert getattr(model, "_epic_ext_handle", None) is None
