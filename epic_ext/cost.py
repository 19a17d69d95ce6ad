"""The analytic cost of visual-token compression: prefill FLOPs and KV-cache bytes of a language model when
decoder layer K keeps `kept` of the `n_visual` visual tokens. Layers < K see all n prompt tokens, layers >= K see
n' = n - n_visual + kept (text is never dropped), and their KV cache is n' long.

Shapes are LMShape (epic_ext.models.families): every family's built-in shapes of released checkpoints (written in
code, no download), a checkpoint's config, or a model. Families with anyres or dynamic resolution have no fixed
visual-token count: each built-in shape carries a documented typical count, and `visual_tokens=` sets another.
Measured latency and the command line are in epic_ext.efficiency.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import torch

from .models.families import LMShape, builtin_shapes

_logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _shape_from_config(config, name: str) -> LMShape:
    text = getattr(config, "text_config", None) or config
    visual = getattr(config, "image_seq_length", None)
    vision = getattr(config, "vision_config", None)
    if visual is None and getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
        visual = (vision.image_size // vision.patch_size) ** 2  # one crop; anyres / dynamic: pass visual_tokens
    heads = text.num_attention_heads
    return LMShape(name=name, layers=text.num_hidden_layers, hidden=text.hidden_size,
                   intermediate=text.intermediate_size, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
                   visual_tokens=int(visual or 0), family=getattr(config, "model_type", None) or "llava")


def load_config(path: str):
    """The transformers config of a checkpoint directory or of the directory of a config.json."""
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.from_pretrained(os.path.dirname(path) or "." if os.path.isfile(path) else path)


def model_shape(model) -> LMShape:
    """Resolves a built-in name, a checkpoint directory / config.json, a (Llava)Config or a model to an LMShape.

    Args:
        model: "llava-1.5-7b" / "llava-1.5-13b", a local path, a transformers config, a model, or an LMShape.

    Returns:
        The LMShape (visual tokens per image from config.image_seq_length).
    """
    if isinstance(model, LMShape):
        return model
    if isinstance(model, str):
        shapes = builtin_shapes()
        if model in shapes:
            return shapes[model]
        if os.path.exists(model):
            return _shape_from_config(load_config(model), os.path.basename(os.path.normpath(model)))
        raise ValueError(f"model: unknown model {model!r}; built-in names: {', '.join(shapes)} "
                         "(or give a local checkpoint directory or config.json)")
    config = model.config if isinstance(model, torch.nn.Module) else model
    return _shape_from_config(config, getattr(config, "name_or_path", "") or type(model).__name__)


def kept_from_ratio(n_visual: int, ratio: float) -> int:
    """Visual tokens apply_compression keeps at `ratio` (fraction removed): floor((1 - ratio) * n + 0.5)."""
    return min(n_visual, int(math.floor((1.0 - ratio) * n_visual + 0.5)))


def tokens_per_layer(shape: LMShape, n_tokens: int, n_visual: int, layer: int, kept_visual: int) -> list[int]:
    """Sequence length each decoder layer processes at prefill: n for layers < layer, n - n_visual + kept after."""
    if not (0 <= n_visual <= n_tokens):
        raise ValueError(f"n_visual must be in [0, n_tokens={n_tokens}], got {n_visual}")
    if not (0 <= kept_visual <= n_visual):
        raise ValueError(f"kept_visual (keep) must be in [0, n_visual={n_visual}], got {kept_visual}")
    if not (0 <= layer <= shape.layers):
        raise ValueError(f"layer must be in [0, {shape.layers}] ({shape.name} has {shape.layers} layers), got {layer}")
    return [n_tokens] * layer + [n_tokens - n_visual + kept_visual] * (shape.layers - layer)


def layer_flops(shape: LMShape, n: int, formula: str = "fastv") -> int:
    """Prefill FLOPs of one decoder layer over n tokens, by `formula` ("fastv" / "exact"; see prefill_flops)."""
    d, m = shape.hidden, shape.intermediate
    if formula == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if formula == "exact":
        kv_dim = shape.kv_heads * shape.head_dim
        projections = 2 * (2 * n * d * shape.heads * shape.head_dim) + 2 * (2 * n * d * kv_dim)  # q, o; k, v
        attention = 2 * (2 * n * n * shape.heads * shape.head_dim)  # q.k^T and p.v, full square
        return projections + attention + 3 * (2 * n * d * m)  # SwiGLU: gate, up, down
    raise ValueError(f"formula must be 'fastv' or 'exact', got {formula!r}")


def prefill_flops(shape: LMShape, n_tokens_per_layer: Sequence[int], formula: str = "fastv",
                  logits_positions: int = 0) -> int:
    """Prefill FLOPs of the language model (one sample), summed over layers.

    "fastv": FastV's per-layer count 4nd^2 + 2n^2d + 2ndm, the paper's formula. It counts full multi-head
    attention (four d x d projections), a 2-matrix MLP and one FLOP per multiply-add, so for LLaVA-1.5 it is
    ~2.5x below "exact"; reductions in % agree within a point.
    "exact": a Llama layer with SwiGLU and grouped-query attention, 2 FLOPs per multiply-add: q and o
    projections 2nd(heads * head_dim) each (= 2nd^2), k and v 2nd(kv_heads * head_dim) each, scores and
    weighted sum 2n^2(heads * head_dim) each (the full square, as prefill kernels compute it; a causal kernel
    skips about half), MLP 3 x 2ndm. Norms, RoPE, softmax and the vision tower are not counted.

    Args:
        shape: the language model. formula: "fastv" or "exact".
        n_tokens_per_layer: sequence length of each decoder layer (see tokens_per_layer), one entry per layer.
        logits_positions: positions that go through the lm_head (2 d vocab each): 1 at inference, 0 to omit.

    Returns:
        FLOPs as an int.
    """
    if len(n_tokens_per_layer) != shape.layers:
        raise ValueError(f"n_tokens_per_layer must have {shape.layers} entries (one per layer of {shape.name}), "
                         f"got {len(n_tokens_per_layer)}")
    total = sum(layer_flops(shape, int(n), formula) for n in n_tokens_per_layer)
    return total + 2 * logits_positions * shape.hidden * shape.vocab


def kv_cache_bytes(shape: LMShape, n_tokens: int, n_visual: int, layer: int, kept_visual: int, dtype_bytes: int,
                   batch: int = 1) -> int:
    """Bytes of the prefill KV cache: 2 (K, V) * batch * kv_heads * head_dim * dtype_bytes * sum of layer lengths.

    Layers < layer hold n_tokens, layers >= layer hold n_tokens - n_visual + kept_visual (equal to the
    DynamicCache that a model patched with epic_ext.models.apply_compression builds, for equal-length prompts).

    Args:
        shape: the language model. n_tokens: prompt length per sample, visual tokens included.
        n_visual: visual tokens per sample; kept_visual of them survive at `layer`.
        layer: the compression layer K, in [0, layers] (layers: no compression).
        dtype_bytes: bytes per cache element (2 for bf16). batch: samples.

    Returns:
        Bytes as an int.
    """
    lengths = tokens_per_layer(shape, n_tokens, n_visual, layer, kept_visual)
    return 2 * batch * shape.kv_heads * shape.head_dim * dtype_bytes * sum(lengths)


def report(model="llava-1.5-7b", keeps: Sequence[int] | None = None, layer: int = 2, text_tokens: int = 64,
           batch: int = 1, dtype: str = "bf16", method: str = "fastv", visual_tokens: int | None = None) -> list[dict]:
    """Theoretical prefill FLOPs and KV cache for several kept-token settings.

    Args:
        model: anything model_shape accepts.
        keeps: visual tokens kept per setting; default all, 1/3, 2/9, 1/9 (576/192/128/64 for LLaVA-1.5).
        visual_tokens: visual tokens per sample (all its images and frames); default the shape's visual_tokens.
        layer: compression layer K. text_tokens: prompt tokens besides the image. batch: samples.
        dtype: "fp32" / "fp16" / "bf16", the KV-cache element type.
        method: the compressor (sets the lowest allowed K; its scoring cost is not counted).

    Returns:
        One dict per setting: keep, tokens (prompt length before / after K), fastv_tflops, exact_tflops
        (with the lm_head for the last position), their reduction in % vs keeping every visual token, kv_mb
        (1e6 bytes) and kv_reduction_pct.
    """
    from .compress import get_compressor  # noqa: PLC0415

    shape = model_shape(model)
    if visual_tokens is not None:
        if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int) or visual_tokens < 1:
            raise ValueError(f"visual_tokens must be an int >= 1 (visual tokens per sample), got {visual_tokens!r}")
        shape = dataclasses.replace(shape, visual_tokens=visual_tokens)
    n_visual = shape.visual_tokens
    if n_visual < 1:
        raise ValueError(f"visual_tokens: {shape.name} has no fixed visual-token count (anyres or dynamic "
                         "resolution); give the count per sample")
    keeps = list([n_visual, n_visual // 3, 2 * n_visual // 9, n_visual // 9] if keeps is None else keeps)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if text_tokens < 0 or batch < 1:
        raise ValueError(f"text_tokens must be >= 0 and batch >= 1, got text_tokens={text_tokens}, batch={batch}")
    for keep in keeps:
        if not (isinstance(keep, int) and 0 <= keep <= n_visual):
            raise ValueError(f"keep must be in [0, {n_visual}] (visual tokens per sample of {shape.name}), "
                             f"got {keep!r}")
    low = get_compressor(method).min_layer
    if not isinstance(layer, int) or not (low <= layer < shape.layers):
        raise ValueError(f"layer must be in [{low}, {shape.layers - 1}] for method {method!r} on {shape.name} "
                         f"({shape.layers} decoder layers), got {layer!r}")
    n = text_tokens + n_visual
    dtype_bytes = torch.empty((), dtype=DTYPES[dtype]).element_size()

    def costs(keep):
        lengths = tokens_per_layer(shape, n, n_visual, layer, keep)
        return (batch * prefill_flops(shape, lengths, "fastv"), batch * prefill_flops(shape, lengths, "exact", 1),
                kv_cache_bytes(shape, n, n_visual, layer, keep, dtype_bytes, batch))

    base = costs(n_visual)
    rows = []
    for keep in keeps:
        fastv, exact, kv = costs(keep)
        rows.append(dict(model=shape.name, method=method, layer=layer, keep=keep, tokens=n,
                         tokens_after=n - n_visual + keep, fastv_tflops=fastv / 1e12, exact_tflops=exact / 1e12,
                         fastv_reduction_pct=100 * (1 - fastv / base[0]),
                         exact_reduction_pct=100 * (1 - exact / base[1]),
                         kv_bytes=kv, kv_mb=kv / 1e6, kv_reduction_pct=100 * (1 - kv / base[2])))
    return rows
