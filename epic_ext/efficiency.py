"""Prefill FLOPs, KV-cache bytes and measured latency of multimodal LLMs with visual-token compression.

Compression at decoder layer K keeps `kept` of the `n_visual` visual tokens: layers < K see all n prompt tokens,
layers >= K see n' = n - n_visual + kept (text is never dropped), and their KV cache is n' long.

Built-in language-model shapes (written in code, no download): LLaVA-1.5 7B/13B, LLaVA-NeXT (vicuna-7b,
mistral-7b), LLaVA-OneVision-7B, Qwen2.5-VL-7B, Qwen3-VL-8B. Families with anyres or dynamic resolution have no
fixed visual-token count: each shape carries a documented typical count, and `--visual-tokens` sets another.

    python -m epic_ext.efficiency --model llava-1.5-7b --layer 2 --keep 576 192 128 64
    python -m epic_ext.efficiency --model qwen2.5-vl-7b --visual-tokens 1296 --keep 1296 324 144
    python -m epic_ext.efficiency --measure --tiny --device cpu     # random weights, CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

_logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_FRACTION = 0.6  # --measure refuses when the weights need more than this share of the free memory


@dataclasses.dataclass(frozen=True)
class LMShape:
    """The dimensions of a Llama-style language model that FLOPs and KV bytes depend on."""

    name: str
    layers: int
    hidden: int  # d
    intermediate: int  # m (SwiGLU width)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    visual_tokens: int = 576  # per sample: one image (LLaVA-1.5), or a typical anyres / dynamic count (see below)
    family: str = "llava"  # the transformers model_type of the multimodal model


# The language models' dimensions, from the released checkpoints' config.json (transformers ports):
# - llava-1.5-7b / -13b: Vicuna-7B / -13B, vocab 32064 (32000 + <image> + padding to 64). 576 = (336 / 14)^2.
# - llava-next-vicuna-7b (llava-hf/llava-v1.6-vicuna-7b-hf): Vicuna-7B as above. llava-next-mistral-7b
#   (llava-hf/llava-v1.6-mistral-7b-hf): Mistral-7B-Instruct-v0.2, 14336 MLP, 8 KV heads, vocab 32064. 2928 visual
#   tokens = a 672x672 image: base crop 576 + a 2x2 grid of 336-px crops (48 x 48 = 2304) + 48 newline slots (the
#   image feature size vLLM's configs use for these checkpoints).
# - llava-onevision-7b (llava-hf/llava-onevision-qwen2-7b-ov-hf): Qwen2-7B-Instruct (28 layers, d 3584, MLP 18944,
#   28 heads / 4 KV heads of 128), vocab 152128 (152064 + <image>, <video>, padded to 64 by the conversion script).
#   3699 visual tokens = a 768x768 image: base 729 = (384 / 14)^2 + a 2x2 grid of 384-px crops (54 x 54 = 2916) + 54
#   newline slots. A video costs 196 tokens per frame (27 x 27 pooled to 14 x 14) + 1: 32 frames = 6273.
# - qwen2.5-vl-7b (Qwen/Qwen2.5-VL-7B-Instruct): 28 layers, d 3584, MLP 18944, 28 heads / 4 KV heads of 128, vocab
#   152064 (its module printout: embed_tokens 152064 x 3584, k_proj 3584 -> 512). 1296 visual tokens = a 1008x1008
#   image: (1008 / 14)^2 patches merged 2x2.
# - qwen3-vl-8b (Qwen/Qwen3-VL-8B-Instruct): Qwen3-8B text model, 36 layers, d 4096, MLP 12288, 32 heads / 8 KV heads
#   of 128, vocab 151936 (torchtitan's Qwen3-VL 8B flavour mirrors the config). 1024 visual tokens = a 1024x1024
#   image: (1024 / 16)^2 patches merged 2x2.
BUILTIN_SHAPES = {
    "llava-1.5-7b": LMShape("llava-1.5-7b", 32, 4096, 11008, 32, 32, 128, 32064),  # Vicuna-7B
    "llava-1.5-13b": LMShape("llava-1.5-13b", 40, 5120, 13824, 40, 40, 128, 32064),  # Vicuna-13B
    "llava-next-vicuna-7b": LMShape("llava-next-vicuna-7b", 32, 4096, 11008, 32, 32, 128, 32064, 2928, "llava_next"),
    "llava-next-mistral-7b": LMShape("llava-next-mistral-7b", 32, 4096, 14336, 32, 8, 128, 32064, 2928, "llava_next"),
    "llava-onevision-7b": LMShape("llava-onevision-7b", 28, 3584, 18944, 28, 4, 128, 152128, 3699, "llava_onevision"),
    "qwen2.5-vl-7b": LMShape("qwen2.5-vl-7b", 28, 3584, 18944, 28, 4, 128, 152064, 1296, "qwen2_5_vl"),
    "qwen3-vl-8b": LMShape("qwen3-vl-8b", 36, 4096, 12288, 32, 8, 128, 151936, 1024, "qwen3_vl"),
}


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


def _load_config(path: str):
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
        if model in BUILTIN_SHAPES:
            return BUILTIN_SHAPES[model]
        if os.path.exists(model):
            return _shape_from_config(_load_config(model), os.path.basename(os.path.normpath(model)))
        raise ValueError(f"model: unknown model {model!r}; built-in names: {', '.join(BUILTIN_SHAPES)} "
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


def cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers DynamicCache."""
    from .models import _hf  # noqa: PLC0415

    tensors = [t for pair in _hf.cache_layer_tensors(cache) for t in pair if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


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


# ------------------------------------------------------------------------------------------------ measurement --
def llava_config(model="llava-1.5-7b", *, layers: int | None = None, tiny: bool = False):
    """A LlavaConfig: LLaVA-1.5 (CLIP ViT-L/14-336, gelu projector, feature layer -2) around a built-in shape,
    a checkpoint's config for a path, or, with tiny=True, a tiny model with 576 visual tokens for CPU runs.

    Args:
        model: a built-in name, an LMShape, or a local checkpoint directory / config.json.
        layers: override the number of decoder layers (smaller model for a smoke run).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig  # noqa: PLC0415

    if tiny:
        from .models.tiny import tiny_llava_config  # noqa: PLC0415

        config = tiny_llava_config(text_layers=layers or 4, image_size=336, patch_size=14, max_positions=4096)
    elif isinstance(model, str) and model not in BUILTIN_SHAPES and os.path.exists(model):
        config = _load_config(model)
    else:
        shape = model_shape(model)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, patch_size=14, image_size=336, projection_dim=768)
        text = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                           num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab,
                           max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                             image_seq_length=shape.visual_tokens, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=0)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        config.text_config.num_hidden_layers = layers
    return config


def available_memory(device: str) -> int:
    """Free bytes on `device`: torch.cuda.mem_get_info for CUDA, MemAvailable of /proc/meminfo for CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("available_memory: no MemAvailable in /proc/meminfo")


def build_random_llava(config, dtype: str = "bf16", device: str = "cpu"):
    """A LlavaForConditionalGeneration with random weights, created directly in `dtype` on `device` (eval mode).

    Raises:
        MemoryError: when the weights would take more than 60% of the free memory of the device.
    """
    from transformers import LlavaForConditionalGeneration  # noqa: PLC0415

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device available")
    with torch.device("meta"):
        params = sum(p.numel() for p in LlavaForConditionalGeneration._from_config(config).parameters())
    weight_bytes = params * torch.empty((), dtype=DTYPES[dtype]).element_size()
    free = available_memory(device)
    if weight_bytes > MEMORY_FRACTION * free:
        raise MemoryError(f"--measure: the model has {params / 1e9:.2f}B parameters, {weight_bytes / 2**30:.1f} GiB "
                          f"in {dtype}, more than {MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free on "
                          f"{device}; use a GPU, --layers N or --tiny for a smoke run")
    _logger.info("building a random %.2fB-parameter LLaVA in %s on %s", params / 1e9, dtype, device)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=DTYPES[dtype])
    return model.eval()


def measure_latency(model, keep: int, *, layer: int = 2, method: str = "fastv", text_tokens: int = 64,
                    batch: int = 1, decode_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    """Times prefill (one forward with pixel_values, use_cache=True) and greedy decoding with the cache.

    Args:
        model: a LlavaForConditionalGeneration; compression is applied (keep < visual tokens) and removed again.
        keep: visual tokens kept per sample. text_tokens: prompt tokens besides the image (half before it).
        decode_tokens: greedy steps timed after each prefill. repeats: timed runs after one warm-up (median).

    Returns:
        dict(keep, prefill_ms, decode_ms_per_token, kv_bytes_measured) with the prefill cache's bytes.
    """
    from .models import _hf, apply_compression  # noqa: PLC0415

    config, device = model.config, str(next(model.parameters()).device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_visual, image_token, size = config.image_seq_length, config.image_token_id, config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, min(image_token, config.text_config.vocab_size) - 1, (batch, text_tokens), generator=g)
    image = torch.full((batch, n_visual), image_token, dtype=torch.long)
    input_ids = torch.cat([text[:, : text_tokens // 2], image, text[:, text_tokens // 2:]], dim=1).to(device)
    pixel_values = torch.randn(batch, 3, size, size, generator=g).to(device, next(model.parameters()).dtype)
    handle = apply_compression(model, method, layer=layer, keep=keep) if keep < n_visual else None
    prefill_s, decode_s, kv_bytes = [], [], 0
    try:
        with torch.inference_mode():
            for run in range(repeats + 1):
                sync()
                start = time.perf_counter()
                out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
                sync()
                prefill = time.perf_counter() - start
                cache = _hf.output_cache(out)
                kv_bytes = cache_bytes(cache)
                logits = out.logits[:, -1].float()
                start = time.perf_counter()
                for _ in range(decode_tokens):
                    if image_token < logits.shape[-1]:
                        logits[:, image_token] = -math.inf  # a generated image token would need pixel_values
                    step = model(input_ids=logits.argmax(-1, keepdim=True), use_cache=True, **_hf.cache_kwargs(cache))
                    cache, logits = _hf.output_cache(step), step.logits[:, -1].float()
                sync()
                if run > 0:  # run 0 warms up
                    prefill_s.append(prefill)
                    decode_s.append((time.perf_counter() - start) / max(decode_tokens, 1))
    finally:
        if handle is not None:
            handle.remove()
    result = dict(keep=keep, prefill_ms=1e3 * statistics.median(prefill_s),
                  decode_ms_per_token=1e3 * statistics.median(decode_s), kv_bytes_measured=kv_bytes)
    _logger.info("measured %s", result)
    return result


# ------------------------------------------------------------------------------------------------------- CLI --
_COLUMNS = [("keep", "keep", "d"), ("tokens_after", "tokens>=K", "d"), ("fastv_tflops", "FastV TFLOPs", ".4g"),
            ("fastv_reduction_pct", "-%", ".1f"), ("exact_tflops", "exact TFLOPs", ".4g"),
            ("exact_reduction_pct", "-%", ".1f"), ("kv_mb", "KV MB", ".2f"), ("kv_reduction_pct", "-%", ".1f")]
_MEASURED = [("kv_mb_measured", "KV MB meas.", ".2f"), ("prefill_ms", "prefill ms", ".2f"),
             ("prefill_speedup", "x 1st", ".2f"), ("decode_ms_per_token", "decode ms/tok", ".2f")]


def format_table(rows: list[dict]) -> str:
    """The rows of report() (with measured columns when present) as an aligned text table."""
    columns = _COLUMNS + ([c for c in _MEASURED if c[0] in rows[0]] if rows else [])
    cells = [[title for _, title, _ in columns]] + [[format(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


_OPTIONS = ("keep", "layers", "layer", "model", "dtype", "device", "text_tokens", "batch", "visual_tokens", "measure")


def _parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, Parser  # noqa: PLC0415

    p = Parser(prog="python -m epic_ext.efficiency", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="llava-1.5-7b", help=f"{' | '.join(BUILTIN_SHAPES)} | checkpoint dir")
    p.add_argument("--layer", type=int, default=2, help="compression layer K")
    p.add_argument("--keep", type=int, nargs="+", help="visual tokens kept (default 576 192 128 64)")
    p.add_argument("--method", default="fastv", help="compressor for --measure (fastv, dart, random)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens besides the image")
    p.add_argument("--visual-tokens", type=int,
                   help="visual tokens per sample, all images and frames (default: the model's typical count, "
                        "e.g. 576 for LLaVA-1.5, 2928 for LLaVA-NeXT, 3699 for LLaVA-OneVision, 1296 for Qwen2.5-VL)")
    p.add_argument("--batch", type=int, default=1, help="samples per prefill")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the weights and KV cache")
    p.add_argument("--measure", action="store_true",
                   help="build a random-weight model and time prefill (vision tower included) and decode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of --measure")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per --measure repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of --measure (the median is shown)")
    p.add_argument("--layers", type=int, help="decoder layers of the model (shrink for a smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny model with 576 visual tokens (CPU smoke run)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the FLOPs / KV table, and with --measure the measured latencies, to stdout."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        shape = model_shape("llava-1.5-7b" if args.tiny else args.model)
        builds = args.tiny or args.measure or args.layers is not None
        if builds and not args.tiny and shape.family != "llava":
            raise ValueError(f"measure / --layers build LLaVA-1.5 models only; {shape.name} is a {shape.family} "
                             "model: drop --measure / --layers for its FLOPs and KV table")
        if builds and args.visual_tokens is not None:
            raise ValueError("visual_tokens: --measure, --tiny and --layers build a LLaVA-1.5 model, whose image has "
                             "its own visual-token count; drop --visual-tokens")
        config = llava_config(args.model, layers=args.layers, tiny=args.tiny) if builds else None
        if config is not None:  # the table describes the model that --tiny / --layers builds
            shape = dataclasses.replace(model_shape(config), name="tiny-llava" if args.tiny else shape.name)
        rows = report(shape, args.keep, args.layer, args.text_tokens, args.batch, args.dtype, args.method,
                      args.visual_tokens)
        shape = dataclasses.replace(shape, visual_tokens=args.visual_tokens or shape.visual_tokens)
        print(f"{shape.name}: {shape.layers} layers, d={shape.hidden}, m={shape.intermediate}, heads={shape.heads}/"
              f"{shape.kv_heads} kv, {shape.visual_tokens} visual + {args.text_tokens} text tokens, K={args.layer}, "
              f"batch {args.batch}, {args.dtype}", flush=True)
        if args.measure:
            if args.decode_tokens < 0 or args.repeats < 1:
                raise ValueError("--decode-tokens must be >= 0 and --repeats >= 1")
            print(f"building a random-weight model on {args.device} ...", flush=True)
            model = build_random_llava(config, args.dtype, args.device)
            for row in rows:
                print(f"measuring keep={row['keep']} ...", flush=True)
                measured = measure_latency(model, row["keep"], layer=args.layer, method=args.method,
                                           text_tokens=args.text_tokens, batch=args.batch,
                                           decode_tokens=args.decode_tokens, repeats=args.repeats)
                row.update(measured, kv_mb_measured=measured["kv_bytes_measured"] / 1e6)
            for row in rows:
                row["prefill_speedup"] = rows[0]["prefill_ms"] / row["prefill_ms"]
    except (ValueError, MemoryError) as exc:  # name the command-line option the library's message names
        name = next((n for n in _OPTIONS if str(exc).startswith(n)), None)
        parser.error(f"--{name.replace('_', '-')}{str(exc)[len(name):]}" if name else str(exc))
    print(format_table(rows))
    if args.measure and any(r["kv_bytes_measured"] != r["kv_bytes"] for r in rows):
        print("note: measured KV bytes differ from the formula", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
