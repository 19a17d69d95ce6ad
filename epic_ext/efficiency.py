"""`python -m epic_ext.efficiency`: the analytic cost table (epic_ext.cost) of a model at several kept-token
settings and, with --measure, measured prefill and decode latency of a random-weight LLaVA-1.5 built from a config.

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

from .cost import DTYPES, load_config, model_shape, report
from .models.families import builtin_shapes, check_attn_implementation, set_text_attn_implementation

_logger = logging.getLogger(__name__)

MEMORY_FRACTION = 0.6  # --measure refuses when the weights need more than this share of the free memory


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
    elif isinstance(model, str) and model not in builtin_shapes() and os.path.exists(model):
        config = load_config(model)
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


def build_random_llava(config, dtype: str = "bf16", device: str = "cpu", attn_implementation: str | None = None):
    """A LlavaForConditionalGeneration with random weights, created directly in `dtype` on `device` (eval mode).

    Args:
        attn_implementation: the language model's attention (epic_ext.models.families.ATTN_IMPLEMENTATIONS, checked
            before the model is built); None: transformers' default (sdpa).

    Raises:
        MemoryError: when the weights would take more than 60% of the free memory of the device.
    """
    from transformers import LlavaForConditionalGeneration  # noqa: PLC0415

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device available")
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation, device, DTYPES[dtype])
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
    if attn_implementation is not None:
        set_text_attn_implementation(model, attn_implementation)
    return model.eval()


def cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers DynamicCache."""
    from .models import _hf  # noqa: PLC0415

    tensors = [t for pair in _hf.cache_layer_tensors(cache) for t in pair if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


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


_OPTIONS = ("attn_implementation", "keep", "layers", "layer", "model", "dtype", "device", "text_tokens", "batch", "visual_tokens", "measure")


def _parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, Parser, add_attn_implementation_argument  # noqa: PLC0415

    p = Parser(prog="python -m epic_ext.efficiency", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="llava-1.5-7b", help=f"{' | '.join(builtin_shapes())} | checkpoint dir")
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
    add_attn_implementation_argument(p, " in the --measure model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the FLOPs / KV table, and with --measure the measured latencies, to stdout."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.measure:  # before anything is built
            check_attn_implementation(args.attn_implementation, args.device, DTYPES[args.dtype])
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
            print(f"building a random-weight model on {args.device} ({args.attn_implementation} attention) ...",
                  flush=True)
            model = build_random_llava(config, args.dtype, args.device, args.attn_implementation)
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
