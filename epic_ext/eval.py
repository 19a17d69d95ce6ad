"""`python -m epic_ext.eval`: exact-match accuracy of a LLaVA model on a LLaVA-format QA file at several
compression settings, with the efficiency figures (visual tokens kept, prefill FLOPs, KV cache) beside each row.

Each item is the first human turn (the question, with its image) and the first gpt turn (the reference answer);
answers are generated greedily and compared after normalisation (lower case, punctuation and surrounding space
removed). Items with a "family" field are also scored per family.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import re
import string
from collections.abc import Sequence

import torch

from . import efficiency
from .models import apply_compression

_logger = logging.getLogger(__name__)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def load_items(records: Sequence[dict], image_folder: str | pathlib.Path) -> list[dict]:
    """Question/answer items from LLaVA-format records (first human turn, first gpt turn)."""
    items = []
    for index, record in enumerate(records):
        turns = record.get("conversations") or []
        question = next((t["value"] for t in turns if t.get("from") == "human"), None)
        answer = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if question is None or answer is None:
            raise ValueError(f"eval: record {record.get('id', index)!r} needs a human and a gpt turn")
        images = record.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        if images and "<image>" not in question:
            question = "<image>\n" * len(images) + question
        items.append({"id": record.get("id", index), "question": question, "answer": answer,
                      "family": record.get("family", "all"),
                      "images": [str(pathlib.Path(image_folder) / p) for p in images]})
    return items


def _generate(model, processor, items: list[dict], batch_size: int, max_new_tokens: int, device) -> list[str]:
    from PIL import Image  # noqa: PLC0415

    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    answers = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = ["USER: " + item["question"] + " ASSISTANT:" for item in chunk]
            images = [Image.open(p).convert("RGB") for item in chunk for p in item["images"]]
            inputs = processor(text=prompts, images=images or None, return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, inputs["input_ids"].shape[1]:].tolist():
                if tokenizer.eos_token_id in row:  # the answer ends at the first end-of-sequence token
                    row = row[: row.index(tokenizer.eos_token_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return answers


def evaluate(model, processor, items: list[dict], settings: Sequence[dict], *, batch_size: int = 8,
             max_new_tokens: int = 8, device=None, seed: int = 0) -> list[dict]:
    """Accuracy rows, one per setting.

    Args:
        settings: dicts with "method" and "keep" (visual tokens kept per image; None or all = no compression),
            and optionally "layer" (default 2).
        seed: seeds the generator of random compression, so every model sees the same drop pattern.

    Returns:
        Per setting: method, layer, keep, n, accuracy (%), per-family accuracy, and the efficiency figures of
        efficiency.report for this model's shape (prefill TFLOPs by the FastV formula and exactly, KV MB).
    """
    device = device or next(model.parameters()).device
    model.eval()
    shape = efficiency.model_shape(model)
    rows = []
    for setting in settings:
        method, keep, layer = setting.get("method", "fastv"), setting.get("keep"), setting.get("layer", 2)
        full = keep is None or keep >= shape.visual_tokens
        handle = None
        if not full:
            kwargs = {"generator": torch.Generator().manual_seed(seed)} if method == "random" else {}
            handle = apply_compression(model, method, layer=layer, keep=int(keep), **kwargs)
        try:
            predictions = _generate(model, processor, items, batch_size, max_new_tokens, device)
        finally:
            if handle is not None:
                handle.remove()
        correct = [normalize_answer(p) == normalize_answer(item["answer"]) for p, item in zip(predictions, items)]
        families: dict[str, list[bool]] = {}
        for ok, item in zip(correct, items):
            families.setdefault(item["family"], []).append(ok)
        kept = shape.visual_tokens if full else int(keep)
        # without compression the layer is irrelevant: any valid one gives the uncompressed cost
        cost = efficiency.report(shape, keeps=[kept], layer=0 if full else layer, text_tokens=32,
                                 dtype="fp32" if model.dtype == torch.float32 else "bf16",
                                 method="random" if full else method)[0]
        rows.append({"method": "none" if full else method, "layer": None if full else layer, "keep": kept,
                     "n": len(items), "accuracy": 100.0 * sum(correct) / max(len(correct), 1),
                     "families": {k: 100.0 * sum(v) / len(v) for k, v in sorted(families.items())},
                     "prefill_tflops_fastv": cost["fastv_tflops"], "prefill_tflops_exact": cost["exact_tflops"],
                     "kv_mb": cost["kv_mb"], "predictions": predictions})
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epic_ext.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="llava-hf checkpoint directory (model + processor)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON / JSONL QA file")
    parser.add_argument("--image-folder", default=".")
    parser.add_argument("--method", nargs="+", default=["fastv"])
    parser.add_argument("--keep", type=int, nargs="+", default=[576, 192, 128, 64])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N items only")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the rows as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: PLC0415

    from .train.data import load_records  # noqa: PLC0415

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=efficiency.DTYPES[args.dtype])
    model.to(args.device)
    processor = AutoProcessor.from_pretrained(args.model)
    items = load_items(load_records(args.data), args.image_folder)
    if args.limit:
        items = items[: args.limit]
    settings = [{"method": m, "keep": k, "layer": args.layer} for m in args.method for k in args.keep]
    rows = evaluate(model, processor, items, settings, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, device=args.device, seed=args.seed)
    print(format_rows(rows))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
