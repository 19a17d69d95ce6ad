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
from .cli import (HelpFormatter, Parser, UsageError, add_attn_implementation_argument, check_attn_implementation_option,
                  check_skipped, describe_skips, load_model_config, load_records_option, run_main)
from .compress import available as available_methods
from .compress import get_compressor
from .models import apply_compression
from .data.records import IMAGE_PLACEHOLDER, image_names, placeholder_problem, video_frames
from .models.adapter import adapter_for
from .models.families import FAMILIES, TRAINABLE, Family, family_of

_logger = logging.getLogger(__name__)

DESCRIPTION = ("Measures the exact-match accuracy of a LLaVA model on a LLaVA-format QA file at several compression "
               "settings and prints it beside each setting's visual tokens kept, prefill FLOPs and KV cache.")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _item_problem(question: str, images: list[str], frames: list[str] = ()) -> tuple[str, str] | None:
    """(reason, detail) when the item cannot be evaluated: placeholders that do not fit the images (the video), a
    missing or undecodable image or video frame. The reasons are the training data's
    (epic_ext.data.records.SKIP_REASONS)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    problem = placeholder_problem([{"from": "human", "value": question}], len(images), int(bool(frames)))
    if problem is not None:
        return "bad_record", problem
    for path in [*images, *frames]:
        if not os.path.isfile(path):
            return "missing_image", f"image file {path} is missing"
        try:
            with Image.open(path):  # reads the header only
                pass
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            return "corrupt_image", f"image file {path} cannot be decoded: {error}"
    return None


def collect_items(records: Sequence[dict], image_folder: str | os.PathLike, *,
                  on_bad_image: str = "skip", videos: bool = False) -> tuple[list[dict], Counter]:
    """Question/answer items from LLaVA-format records (first human turn, first gpt turn), skipping what cannot
    be evaluated with the training data's policy.

    Args:
        records: LLaVA-format records (epic_ext.train.data.load_records).
        image_folder: folder the records' image paths start from.
        on_bad_image: "skip" (count the record and log a warning) or "error" (ValueError naming the record) for
            a missing or undecodable image or placeholders that do not fit the images. Records without a human or
            a gpt turn (nothing to ask, no reference answer) are always skipped ("no_answer").
        videos: whether the model takes video records (the processor's `videos`); without it a record with a
            ``video`` is a bad record.

    Returns:
        (items, skipped): items with id, question (``<image>`` placeholders added when absent), answer, family,
        images (paths), and for a video record video (its frame paths, time order) and fps (the record's, or
        None); skipped maps reason -> number of records.
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
        frames = [os.path.join(image_folder, name) for name in video_frames(record)]
        problem = (("bad_record", "a video record: this model takes images only") if frames and not videos
                   else _item_problem(question, images, frames))
        if problem is not None:
            if on_bad_image == "error":
                raise ValueError(f"eval: record {record_id!r} (index {index}): {problem[1]}")
            _logger.warning("eval: skipping record %r: %s: %s", record_id, *problem)
            skipped[problem[0]] += 1
            continue
        if images and IMAGE_PLACEHOLDER not in question:
            question = (IMAGE_PLACEHOLDER + "\n") * len(images) + question
        item = {"id": record_id, "question": question, "answer": answer, "family": record.get("family", "all"),
                "images": images}
        if frames:
            item.update(video=frames, fps=record.get("fps"))
        items.append(item)
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
            (paths or PIL images, in placeholder order) and optionally "video" (its frames as paths or PIL images,
            time order) with "fps" (frames per second of those frames; None: DEFAULT_VIDEO_FPS).

    Raises:
        ValueError: a video item for a processor or family that takes images only.
    """
    from .data.chat import DEFAULT_VIDEO_FPS  # noqa: PLC0415

    images = [[_open_image(image) for image in item["images"]] for item in chunk]
    has_video = [item.get("video") is not None for item in chunk]
    if hasattr(processor, "prompt_batch"):
        if any(has_video) and not processor.videos:
            raise ValueError("a video sample: this model family takes images only here")
        videos = [([_open_image(frame) for frame in item["video"]], float(item.get("fps") or DEFAULT_VIDEO_FPS))
                  if video else None
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
            count means no compression; per sample for the dynamic-resolution families; None = no compression)
            or "ratio" (the fraction of each sample's visual tokens removed, in [0, 1); 0 = no compression), and
            optionally "layer" (default 2).
        processor: LLaVA-1.5's processor, or a ChatProcessor (epic_ext.data.chat) for Qwen2.5-VL / Qwen3-VL /
            LLaVA-OneVision.
        seed: seeds the generator of random compression, so every model sees the same drop pattern.

    Returns:
        Per setting: method, layer, keep (visual tokens kept; for a ratio, of the mean sample), ratio (None for a
        keep setting), n, accuracy (%), per-family accuracy, and the efficiency figures of cost.report for this
        model's shape (prefill TFLOPs by the FastV formula and exactly, KV MB).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be an int >= 1, got {batch_size!r}")
    device = device or next(model.parameters()).device
    model.eval()
    shape = cost.model_shape(model)
    # a per-image budget has a fixed count; dynamic resolution is counted per item
    fixed = shape.visual_tokens if family_of(model, FAMILIES).per_image_budget else None
    for setting in settings:
        keep, ratio = setting.get("keep"), setting.get("ratio")
        if keep is not None and ratio is not None:
            raise ValueError(f"evaluate: a setting gives keep or ratio, not both, got {setting}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0.0 <= ratio < 1.0):
            raise ValueError(f"evaluate: ratio must be a number in [0, 1) (the fraction of visual tokens removed), "
                             f"got {ratio!r}")
        if keep is not None and fixed is not None and not 0 <= keep <= fixed:
            raise ValueError(f"evaluate: keep must be in [0, {fixed}] (the model's visual tokens per image), got "
                             f"{keep}")
        if keep is not None and keep < 0:
            raise ValueError(f"evaluate: keep must be >= 0, got {keep}")
    rows = []
    for setting in settings:
        method, keep, layer = setting.get("method", "fastv"), setting.get("keep"), setting.get("layer", 2)
        ratio = setting.get("ratio")
        if ratio is not None:
            full = ratio == 0
        else:
            full = keep is None or (fixed is not None and keep >= fixed)
        handle = None
        if not full:
            kwargs = {"generator": torch.Generator().manual_seed(seed)} if method == "random" else {}
            amount = {"ratio": float(ratio)} if ratio is not None else {"keep": int(keep)}
            handle = apply_compression(model, method, layer=layer, **amount, **kwargs)
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
        if full:
            kept = shape.visual_tokens
        elif ratio is not None:  # what the engine keeps of the mean sample
            kept = cost.kept_from_ratio(shape.visual_tokens, float(ratio))
        else:
            kept = min(int(keep), shape.visual_tokens)
        # without compression the layer is irrelevant: any valid one gives the uncompressed cost
        cost_row = cost.report(shape, keeps=[kept], layer=0 if full else layer, text_tokens=32,
                               dtype="fp32" if model.dtype == torch.float32 else "bf16",
                               method="random" if full else method)[0]
        rows.append({"method": "none" if full else method, "layer": None if full else layer, "keep": kept,
                     "ratio": None if ratio is None else float(ratio), "n": len(items), "accuracy": 100.0 * sum(correct) / max(len(correct), 1),
                     "families": {k: 100.0 * sum(v) / len(v) for k, v in sorted(families.items())},
                     "prefill_tflops_fastv": cost_row["fastv_tflops"],
                     "prefill_tflops_exact": cost_row["exact_tflops"], "kv_mb": cost_row["kv_mb"], "predictions": predictions})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The rows as a table; a `ratio` column when a row was set by ratio (its `keep` is then the mean sample's)."""
    families = sorted({f for r in rows for f in r["families"]})
    by_ratio = any(r.get("ratio") is not None for r in rows)
    head = f"{'method':<8} {'layer':>5} " + (f"{'ratio':>6} " if by_ratio else "") + f"{'keep':>5} {'n':>5} "
    head += f"{'acc %':>7} " + " ".join(f"{f[:8]:>8}" for f in families) + f" {'GFLOPs':>10} {'KV MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fam = " ".join(f"{r['families'].get(f, float('nan')):>8.1f}" for f in families)
        ratio = (f"{r['ratio']:>6.3g} " if r.get("ratio") is not None else f"{'-':>6} ") if by_ratio else ""
        lines.append(f"{r['method']:<8} {str(r['layer'] if r['layer'] is not None else '-'):>5} {ratio}{r['keep']:>5} "
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
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--keep", type=int, nargs="+", default=None,
                        help="visual tokens kept per image for LLaVA-1.5 (default: all of the model's, 1/3, 2/9 and 1/9 "
                             "of them: 576 192 128 64); per sample, over all its images, for Qwen2.5-VL / Qwen3-VL / "
                             "OneVision (there --keep or --ratio is required: their counts vary with the image sizes)")
    amount.add_argument("--ratio", type=float, nargs="+", default=None,
                        help="instead of --keep: fractions of each sample's visual tokens removed, each in [0, 1) "
                             "(0: the uncompressed model), for every family")
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
    add_attn_implementation_argument(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of random compression")
    return parser


def _check_args(args, config) -> list[int] | None:
    """Validates the command line against the model's config.json; returns the visual-token counts to keep (None
    with --ratio)."""
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
    if args.ratio is not None:
        bad = [r for r in args.ratio if not 0.0 <= r < 1.0]
        if bad:
            raise UsageError(f"--ratio values must be in [0, 1) (the fraction of visual tokens removed), got {bad}")
        keeps = None
    elif visual is None:  # dynamic resolution: no fixed count, keep is per sample over all its visual tokens
        if not args.keep:
            raise UsageError(f"--keep or --ratio is required for a {family.name} model (its visual tokens per sample "
                             "vary with the image sizes): give the visual tokens kept per sample, or the fraction "
                             "removed")
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
    compresses = (any(r > 0 for r in args.ratio) if keeps is None
                  else any(visual is None or k < visual for k in keeps))
    if compresses and not low <= args.layer < layers:
        raise UsageError(f"--layer must be in [{low}, {layers - 1}] for --method {' '.join(args.method)} on this "
                         f"model ({layers} decoder layers), got {args.layer}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available")
    check_attn_implementation_option(args.attn_implementation, args.device, cost.DTYPES[args.dtype])
    return keeps


METHODS = ("fastv", "dart", "random")


def compression_settings(family: Family, config, keeps: Sequence[int] | None, *, layer: int,
                         methods: Sequence[str] = METHODS, baseline: bool = True,
                         ratios: Sequence[float] | None = None) -> list[dict]:
    """The settings `evaluate` runs: the uncompressed model first (unless `baseline` is False), then each method at
    every kept count that compresses (for a per-image budget, counts below the model's visual tokens per image), or,
    with `ratios` instead of `keeps`, at every ratio above 0 (the uncompressed row says ratio 0)."""
    if ratios is not None:
        settings = [{"method": "none", "ratio": 0.0, "layer": layer}] if baseline else []
        return settings + [{"method": method, "ratio": float(ratio), "layer": layer} for method in methods
                           for ratio in ratios if ratio > 0]
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


def check_video_frames(family: Family, items: Sequence[dict], option: str = "--data") -> None:
    """A family that batches videos of one frame count only (LLaVA-OneVision) refuses items whose videos differ."""
    counts = sorted({len(item["video"]) for item in items if item.get("video")})
    if family.uniform_video_frames and len(counts) > 1:
        raise UsageError(f"{option}: {family.title} batches videos of one frame count; the video records have "
                         f"{counts} frames: sample every video to the same number of frames")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    config = load_model_config(args.model, families=TRAINABLE)
    keeps = _check_args(args, config)
    records = load_records_option(args.data, "--data")
    family = family_of(config)
    processor = family.load_processor(args.model)  # tokenizer and image processor: it says whether video is taken
    try:
        items, skipped = collect_items(records, args.image_folder, on_bad_image=args.on_bad_image,
                                       videos=getattr(processor, "videos", False))
    except ValueError as error:
        raise UsageError(f"--on-bad-image error: {error}") from error
    check_skipped(skipped, len(records), args.max_skip_fraction, image_folder=args.image_folder,
                  what="evaluation records")
    if args.limit is not None:
        items = items[: args.limit]
    check_video_frames(family, items)
    model = family.load_model(args.model, cost.DTYPES[args.dtype], attn_implementation=args.attn_implementation)
    model.to(args.device)
    visual = family.visual_tokens_per_image(config)  # the uncompressed row when a keep or a ratio asks for it
    baseline = (visual is None or any(k >= visual for k in keeps)) if keeps is not None else 0 in args.ratio
    settings = compression_settings(family, config, keeps, layer=args.layer, methods=args.method,
                                    baseline=visual is None or baseline, ratios=args.ratio)
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
