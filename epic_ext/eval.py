"""`python -m epic_ext.eval`: exact-match accuracy of a LLaVA-1.5, Qwen2.5-VL, Qwen3-VL or LLaVA-OneVision model on
a LLaVA-format QA file at several compression settings, with the efficiency figures (visual tokens kept, prefill FLOPs, KV cache) beside each row.

Each item is the first human turn (the question, with its image) and the first gpt turn (the reference answer);
answers are generated greedily and compared after normalisation (lower case, punctuation and surrounding space
removed). Items with a "family" field are also scored per family.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

from . import cost
from .cli import (HelpFormatter, Parser, UsageError, check_skipped, describe_skips, load_model_config,
                  load_records_option, run_main)
from .compress import available as available_methods
from .compress import get_compressor
from .models import apply_compression
from .data.records import IMAGE_PLACEHOLDER, image_names
from .models.adapter import adapter_for
from .models.families import FAMILIES, TRAINABLE, Family, family_of

_logger = logging.getLogger(__name__)

DESCRIPTION = ("Measures the exact-match accuracy of a LLaVA model on a LLaVA-format QA file at several compression "
               "settings and prints it beside each setting's visual tokens kept, prefill FLOPs and KV cache.")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _item_problem(question: str, images: list[str]) -> tuple[str, str] | None:
    """(reason, detail) when the item cannot be evaluated: placeholders that do not fit the images, a missing
    or undecodable image. The reasons are the training data's (epic_ext.train.data.SKIP_REASONS)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    placeholders = question.count(IMAGE_PLACEHOLDER) or len(images)
    if placeholders != len(images):
        return "bad_record", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images"
    for path in images:
        if not os.path.isfile(path):
            return "missing_image", f"image file {path} is missing"
        try:
            with Image.open(path):  # reads the header only
                pass
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            return "corrupt_image", f"image file {path} cannot be decoded: {error}"
    return None


def collect_items(records: Sequence[dict], image_folder: str | os.PathLike, *,
                  on_bad_image: str = "skip") -> tuple[list[dict], Counter]:
    """Question/answer items from LLaVA-format records (first human turn, first gpt turn), skipping what cannot
    be evaluated with the training data's policy.

    Args:
        records: LLaVA-format records (epic_ext.train.data.load_records).
        image_folder: folder the records' image paths start from.
        on_bad_image: "skip" (count the record and log a warning) or "error" (ValueError naming the record) for
            a missing or undecodable image or placeholders that do not fit the images. Records without a human or
            a gpt turn (nothing to ask, no reference answer) are always skipped ("no_answer").

    Returns:
        (items, skipped): items with id, question (``<image>`` placeholders added when absent), answer, family,
        images (paths); skipped maps reason -> number of records.
    """
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    items, skipped = [], Counter()
    for index, record in enumerate(records):
        record_id = record.get("id", index)
        turns = record.get("conversations") or []
        question = next((t["value"] for t in turns if t.get("from") == "human"), None)
        answer = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if question is None or answer is None:
            _logger.warning("eval: skipping record %r: it needs a human and a gpt turn", record_id)
            skipped["no_answer"] += 1
            continue
        images = [os.path.join(image_folder, name) for name in image_names(record)]
        problem = (("bad_record", "a video record: evaluation takes images only") if record.get("video")
                   else _item_problem(question, images))
        if problem is not None:
            if on_bad_image == "error":
                raise ValueError(f"eval: record {record_id!r} (index {index}): {problem[1]}")
            _logger.warning("eval: skipping record %r: %s: %s", record_id, *problem)
            skipped[problem[0]] += 1
            continue
        if images and IMAGE_PLACEHOLDER not in question:
            question = (IMAGE_PLACEHOLDER + "\n") * len(images) + question
        items.append({"id": record_id, "question": question, "answer": answer,
                      "family": record.get("family", "all"), "images": images})
    return items, skipped


def load_items(records: Sequence[dict], image_folder: str | os.PathLike) -> list[dict]:
    """The items of `collect_items` (records that cannot be evaluated are skipped with a warning)."""
    return collect_items(records, image_folder)[0]


def _open_image(image):
    from PIL import Image  # noqa: PLC0415

    return image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


def prompt_inputs(processor, chunk: list[dict]) -> dict:
    """The generation inputs of a chunk of items: LLaVA-1.5's ``USER: ... ASSISTANT:`` prompt through its processor,
    or the chat template of a chat-template family (epic_ext.data.chat.ChatProcessor); left padded.

    Args:
        processor: LLaVA-1.5's processor, or a ChatProcessor.
        chunk: items with "question" (``<image>`` / ``<video>`` placeholders where the visuals stand), "images"
            (paths or PIL images, in placeholder order) and optionally "video" (its frames as PIL images, time
            order) with "fps" (frames per second of those frames).

    Raises:
        ValueError: a video item for a processor or family that takes images only.
    """
    from .data.chat import DEFAULT_VIDEO_FPS  # noqa: PLC0415

    images = [[_open_image(image) for image in item["images"]] for item in chunk]
    has_video = [item.get("video") is not None for item in chunk]
    if hasattr(processor, "prompt_batch"):
        if any(has_video) and not processor.videos:
            raise ValueError("a video sample: this model family takes images only here")
        videos = [(item["video"], float(item.get("fps") or DEFAULT_VIDEO_FPS)) if video else None
                  for item, video in zip(chunk, has_video)]
        batch = processor.prompt_batch([[{"from": "human", "value": item["question"]}] for item in chunk], images,
                                       padding_side="left", videos=videos)
        return {k: v for k, v in batch.items() if k not in ("labels", "ids") and v is not None}
    if any(has_video):
        raise ValueError("a video sample: LLaVA-1.5 takes images only")
    prompts = ["USER: " + item["question"] + " ASSISTANT:" for item in chunk]
    flat = [image for item_images in images for image in item_images]
    return dict(processor(text=prompts, images=flat or None, return_tensors="pt", padding=True))


@dataclasses.dataclass
class Generated:
    """What `generate_chunk` returns, one entry per item: the answer, the visual tokens of its prompt (before any
    compression) and its prompt tokens (visual tokens included, padding excluded)."""

    answers: list[str]
    visual_tokens: list[int]
    prompt_tokens: list[int]


def generate_chunk(model, processor, chunk: list[dict], *, max_new_tokens: int, device=None,
                   **generate_kwargs) -> Generated:
    """Generates the answers of a chunk of items in one batch (prompt_inputs; left padded, so every row continues
    from the last column); an answer ends at the first end-of-sequence token.

    Args:
        generate_kwargs: passed to model.generate (default greedy: do_sample=False).
    """
    device = device or next(model.parameters()).device
    visual_ids = torch.tensor(adapter_for(model).visual_token_ids(model.config))
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    try:
        inputs = {k: v.to(device) for k, v in prompt_inputs(processor, chunk).items()}
    finally:
        tokenizer.padding_side = old_side
    ids = inputs["input_ids"].cpu()
    visual_counts = torch.isin(ids, visual_ids).sum(dim=1).tolist()
    prompt_counts = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else \
        [ids.shape[1]] * ids.shape[0]
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(model.dtype)
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
    answers = []
    for row in out[:, ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:  # the answer ends at the first end-of-sequence token
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return Generated(answers, visual_counts, prompt_counts)


def _generate(model, processor, items: list[dict], batch_size: int, max_new_tokens: int, device
              ) -> tuple[list[str], list[int]]:
    """(answers, visual tokens of each item's prompt)."""
    answers, visual_counts = [], []
    for start in range(0, len(items), batch_size):
        generated = generate_chunk(model, processor, items[start:start + batch_size], max_new_tokens=max_new_tokens,
                                   device=device)
        answers += generated.answers
        visual_counts += generated.visual_tokens
    return answers, visual_counts


def evaluate(model, processor, items: list[dict], settings: Sequence[dict], *, batch_size: int = 8,
             max_new_tokens: int = 8, device=None, seed: int = 0) -> list[dict]:
    """Accuracy rows, one per setting.

    Args:
        settings: dicts with "method" and "keep" (visual tokens kept: per image for LLaVA-1.5, where the model's
            count means no compression; per sample for the dynamic-resolution families; None = no compression),
            and optionally "layer" (default 2).
        processor: LLaVA-1.5's processor, or a ChatProcessor (epic_ext.data.chat) for Qwen2.5-VL / Qwen3-VL /
            LLaVA-OneVision.
        seed: seeds the generator of random compression, so every model sees the same drop pattern.

    Returns:
        Per setting: method, layer, keep, n, accuracy (%), per-family accuracy, and the efficiency figures of
        cost.report for this model's shape (prefill TFLOPs by the FastV formula and exactly, KV MB).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be an int >= 1, got {batch_size!r}")
    device = device or next(model.parameters()).device
    model.eval()
    shape = cost.model_shape(model)
    # a per-image budget has a fixed count; dynamic resolution is counted per item
    fixed = shape.visual_tokens if family_of(model, FAMILIES).per_image_budget else None
    for setting in settings:
        keep = setting.get("keep")
        if keep is not None and fixed is not None and not 0 <= keep <= fixed:
            raise ValueError(f"evaluate: keep must be in [0, {fixed}] (the model's visual tokens per image), got "
                             f"{keep}")
        if keep is not None and keep < 0:
            raise ValueError(f"evaluate: keep must be >= 0, got {keep}")
    rows = []
    for setting in settings:
        method, keep, layer = setting.get("method", "fastv"), setting.get("keep"), setting.get("layer", 2)
        full = keep is None or (fixed is not None and keep >= fixed)
        handle = None
        if not full:
            kwargs = {"generator": torch.Generator().manual_seed(seed)} if method == "random" else {}
            handle = apply_compression(model, method, layer=layer, keep=int(keep), **kwargs)
        try:
            predictions, visual_counts = _generate(model, processor, items, batch_size, max_new_tokens, device)
        finally:
            if handle is not None:
                handle.remove()
        if fixed is None:  # the cost of the mean item (at least one visual token)
            shape = dataclasses.replace(shape, visual_tokens=max(round(sum(visual_counts) / max(len(items), 1)), 1))
        correct = [normalize_answer(p) == normalize_answer(item["answer"]) for p, item in zip(predictions, items)]
        families: dict[str, list[bool]] = {}
        for ok, item in zip(correct, items):
            families.setdefault(item["family"], []).append(ok)
        kept = shape.visual_tokens if full else min(int(keep), shape.visual_tokens)
        # without compression the layer is irrelevant: any valid one gives the uncompressed cost
        cost_row = cost.report(shape, keeps=[kept], layer=0 if full else layer, text_tokens=32,
                               dtype="fp32" if model.dtype == torch.float32 else "bf16",
                               method="random" if full else method)[0]
        rows.append({"method": "none" if full else method, "layer": None if full else layer, "keep": kept,
                     "n": len(items), "accuracy": 100.0 * sum(correct) / max(len(correct), 1),
                     "families": {k: 100.0 * sum(v) / len(v) for k, v in sorted(families.items())},
                     "prefill_tflops_fastv": cost_row["fastv_tflops"],
                     "prefill_tflops_exact": cost_row["exact_tflops"], "kv_mb": cost_row["kv_mb"], "predictions": predictions})
    return rows


def format_rows(rows: list[dict]) -> str:
    families = sorted({f for r in rows for f in r["families"]})
    head = f"{'method':<8} {'layer':>5} {'keep':>5} {'n':>5} {'acc %':>7} " + " ".join(f"{f[:8]:>8}" for f in families)
    head += f" {'GFLOPs':>10} {'KV MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fam = " ".join(f"{r['families'].get(f, float('nan')):>8.1f}" for f in families)
        lines.append(f"{r['method']:<8} {str(r['layer'] if r['layer'] is not None else '-'):>5} {r['keep']:>5} "
                     f"{r['n']:>5} {r['accuracy']:>7.1f} {fam} {1000 * r['prefill_tflops_exact']:>10.4g} {r['kv_mb']:>9.4g}")
    return "\n".join(lines)


def build_parser() -> Parser:
    """The parser of `python -m epic_ext.eval`; --help shows every default."""
    parser = Parser(prog="python -m epic_ext.eval", formatter_class=HelpFormatter,
                    description=DESCRIPTION + "\n\n" + " ".join(__doc__.split("\n\n")[1].split()))
    parser.add_argument("--model", required=True, help="checkpoint directory (model + processor): LLaVA-1.5 (llava-hf), "
                        "Qwen2.5-VL, Qwen3-VL or LLaVA-OneVision")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON / JSONL QA file")
    parser.add_argument("--image-folder", default=".", help="folder the records' image paths start from")
    parser.add_argument("--method", nargs="+", default=["fastv"], help=f"compressors, of {available_methods()}")
    parser.add_argument("--keep", type=int, nargs="+", default=None,
                        help="visual tokens kept per image for LLaVA-1.5 (default: all of the model's, 1/3, 2/9 and 1/9 "
                             "of them: 576 192 128 64); per sample, over all its images, for Qwen2.5-VL / Qwen3-VL / "
                             "OneVision "
                             "(required there: their counts vary with the image sizes)")
    parser.add_argument("--layer", type=int, default=2, help="compression layer K")
    parser.add_argument("--batch-size", type=int, default=8, help="items generated together")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="longest generated answer")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only (N >= 1)")
    parser.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                        help="a missing or corrupt image, or placeholders that do not match the images: skip the "
                             "record (counted) or stop")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01,
                        help="stop when more than this share of the records is skipped (as in training)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="model dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of random compression")
    return parser


def _check_args(args, config) -> list[int]:
    """Validates the command line against the model's config.json; returns the visual-token counts to keep."""
    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 <= args.max_skip_fraction <= 1.0:
        raise UsageError(f"--max-skip-fraction must be in [0, 1], got {args.max_skip_fraction}")
    unknown = [m for m in args.method if m not in available_methods()]
    if unknown:
        raise UsageError(f"--method must be among {available_methods()}, got {unknown}")
    family = family_of(config)
    visual = family.visual_tokens_per_image(config)
    if visual is None:  # dynamic resolution: no fixed count, keep is per sample over all its visual tokens
        if not args.keep:
            raise UsageError(f"--keep is required for a {family.name} model (its visual tokens per sample vary with "
                             "the image sizes): give the visual tokens kept per sample")
        keeps = args.keep
        bad = [k for k in keeps if k < 1]
        if bad:
            raise UsageError(f"--keep values must be >= 1, got {bad}")
    else:
        keeps = args.keep or default_keeps(family, config)
        bad = [k for k in keeps if not 1 <= k <= visual]
        if bad:
            raise UsageError(f"--keep must be in [1, {visual}] (the model's visual tokens per image), got {bad}")
    layers = config.text_config.num_hidden_layers
    low = max(get_compressor(m).min_layer for m in args.method)
    if any(visual is None or k < visual for k in keeps) and not low <= args.layer < layers:
        raise UsageError(f"--layer must be in [{low}, {layers - 1}] for --method {' '.join(args.method)} on this "
                         f"model ({layers} decoder layers), got {args.layer}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available")
    return keeps


METHODS = ("fastv", "dart", "random")


def compression_settings(family: Family, config, keeps: Sequence[int], *, layer: int,
                         methods: Sequence[str] = METHODS, baseline: bool = True) -> list[dict]:
    """The settings `evaluate` runs: the uncompressed model first (unless `baseline` is False), then each method at
    every kept count that compresses (for a per-image budget, counts below the model's visual tokens per image)."""
    visual = family.visual_tokens_per_image(config)
    settings = [{"method": "none", "keep": None, "layer": layer}] if baseline else []
    settings += [{"method": method, "keep": keep, "layer": layer} for method in methods for keep in keeps
                 if visual is None or keep < visual]
    return settings


# kept shares of a per-image budget `python -m epic_ext.eval` reports by default: 576 -> 576, 192, 128, 64
EVAL_FRACTIONS = ((1, 1), (1, 3), (2, 9), (1, 9))


def default_keeps(family: Family, config, fractions: Sequence[tuple[int, int]] = EVAL_FRACTIONS) -> list[int]:
    """Kept counts at `fractions` (numerator, denominator) of a per-image budget, rounded down.

    Raises:
        ValueError: a family without a fixed count per image (its kept counts must be given).
    """
    visual = family.visual_tokens_per_image(config)
    if visual is None:
        raise ValueError(f"keep: {family.name} models have no fixed visual-token count; give the counts kept")
    return [visual * numerator // denominator for numerator, denominator in fractions]


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = load_model_config(args.model, families=TRAINABLE)
    keeps = _check_args(args, config)
    records = load_records_option(args.data, "--data")
    try:
        items, skipped = collect_items(records, args.image_folder, on_bad_image=args.on_bad_image)
    except ValueError as error:
        raise UsageError(f"--on-bad-image error: {error}") from error
    check_skipped(skipped, len(records), args.max_skip_fraction, image_folder=args.image_folder,
                  what="evaluation records")
    if args.limit is not None:
        items = items[: args.limit]
    family = family_of(config)
    model = family.load_model(args.model, cost.DTYPES[args.dtype])
    model.to(args.device)
    processor = family.load_processor(args.model)
    visual = family.visual_tokens_per_image(config)  # LLaVA-1.5: the uncompressed row when a keep asks for it
    settings = compression_settings(family, config, keeps, layer=args.layer, methods=args.method,
                                    baseline=visual is None or any(k >= visual for k in keeps))
    rows = evaluate(model, processor, items, settings, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, device=args.device, seed=args.seed)
    if sum(skipped.values()):
        print(f"skipped records: {describe_skips(skipped)}")
    print(format_rows(rows))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m epic_ext.eval`: a user error is one line on stderr and exit status 2."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
