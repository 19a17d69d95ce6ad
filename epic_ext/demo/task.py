"""The embedded demo: a synthetic visual QA task (coloured shapes on a grid) and an offline LLaVA processor.

Everything is made in code, with no download: PNG canvases drawn with PIL, LLaVA-format JSON records, a word-level
tokenizer over the task's closed vocabulary and a PIL-backed CLIP image processor, wrapped as a LlavaProcessor
whose ``<image>`` token is the last id, i.e. ``vocab_size - 1`` of `epic_ext.models.tiny.build_tiny_llava`.

Question families (answers are single words):
- "color": what color is the shape in row two , column three ?            -> red
- "shape": what shape is in row one , column one ?                         -> circle
- "count": how many circles are there ? / how many red shapes are there ?  -> zero .. nine
- "exist": is there a blue triangle ?                                      -> yes / no
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
FAMILIES = ("color", "shape", "count", "exist")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CANVAS_COLOR = (24, 24, 24)
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"
_SPLITS = ("train", "val", "test")
_TEMPLATE_WORDS = ("user", "assistant", ":", "what", "color", "is", "the", "shape", "in", "row", ",", "column",
                   "?", "how", "many", "are", "there", "shapes", "a", "yes", "no", ".")


CAPTION_QUESTION = "describe the image ."


def demo_vocabulary() -> list[str]:
    """Every word the demo prompts and answers can contain (lowercase, punctuation as words), in a fixed order.

    Returns:
        The word list, without special tokens; `build_tiny_processor(demo_vocabulary())` covers the task.
    """
    words = [*_TEMPLATE_WORDS, *COLORS, *SHAPES, *(shape + "s" for shape in SHAPES), *NUMBER_WORDS,
             *CAPTION_QUESTION.split()]
    return list(dict.fromkeys(words))


def build_tiny_processor(vocab_words: Sequence[str], image_size: int = 56, patch_size: int = 14,
                         save_dir: str | os.PathLike | None = None):
    """A LlavaProcessor made offline: word-level tokenizer + PIL CLIP image processor (no torchvision).

    Args:
        vocab_words: words of the vocabulary (lowercased, deduplicated; special tokens among them are ignored).
        image_size: side the images are resized to (square, no centre crop).
        patch_size: the vision tower's patch size; each image becomes (image_size // patch_size)^2 ``<image>``
            tokens, matching `build_tiny_llava` with vision_feature_select_strategy "default".
        save_dir: if given, the processor is saved there (``LlavaProcessor.from_pretrained(save_dir)`` reloads it).

    Returns:
        The LlavaProcessor. Token ids: <unk> 0, <pad> 1, <s> 2, </s> 3, the words, then <image> =
        len(tokenizer) - 1. The tokenizer lowercases, splits on whitespace and punctuation, and adds <s> (BOS)
        with add_special_tokens=True; build the model with build_tiny_llava(vocab_size=len(processor.tokenizer)).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: PLC0415
    from transformers import LlavaProcessor, PreTrainedTokenizerFast  # noqa: PLC0415

    from ..models._hf import clip_image_processor_class  # noqa: PLC0415

    CLIPImageProcessorPil = clip_image_processor_class()  # noqa: N806

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    reserved = {*SPECIAL_TOKENS, IMAGE_TOKEN}
    words = [word for word in dict.fromkeys(word.lower() for word in vocab_words) if word not in reserved]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words, IMAGE_TOKEN])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    backend.add_special_tokens([*SPECIAL_TOKENS, IMAGE_TOKEN])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="right",
                                        extra_special_tokens={"image_token": IMAGE_TOKEN})
    image_processor = CLIPImageProcessorPil(do_resize=True, size={"height": image_size, "width": image_size},
                                            do_center_crop=False, crop_size={"height": image_size, "width": image_size})
    # The processor computes (H // patch)(W // patch) + num_additional_image_tokens, minus 1 for "default"
    # (which drops CLIP's CLS feature); +1 cancels that so the count is the number of patches.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    _check_image_tokens(processor, image_size, patch_size)
    if save_dir is not None:
        processor.save_pretrained(os.fspath(save_dir))
    return processor


def _check_image_tokens(processor, image_size: int, patch_size: int) -> None:
    from PIL import Image  # noqa: PLC0415

    processed = processor.image_processor([Image.new("RGB", (image_size, image_size))], return_tensors="pt")
    expansion = processor.replace_image_token(processed, image_idx=0)
    expected = (image_size // patch_size) ** 2
    if expansion.count(IMAGE_TOKEN) != expected or tuple(processed["pixel_values"].shape[-2:]) != (image_size,) * 2:
        raise RuntimeError(f"processor gives {expansion.count(IMAGE_TOKEN)} image tokens and pixel_values "
                           f"{tuple(processed['pixel_values'].shape)}; expected {expected} tokens of {image_size} px")


def _draw_scene(scene: list[tuple[int, int, str, str]], image_size: int, grid: int):
    from PIL import Image, ImageDraw  # noqa: PLC0415

    canvas = Image.new("RGB", (image_size, image_size), CANVAS_COLOR)
    draw = ImageDraw.Draw(canvas)
    cell = image_size / grid
    margin = max(1.0, cell * 0.15)
    for row, column, color, shape in scene:
        left, top = column * cell + margin, row * cell + margin
        right, bottom = (column + 1) * cell - margin - 1, (row + 1) * cell - margin - 1
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return canvas


def _question(scene: list[tuple[int, int, str, str]], family: str, rng: random.Random) -> tuple[str, str]:
    if family in ("color", "shape"):
        row, column, color, shape = rng.choice(scene)
        where = f"row {NUMBER_WORDS[row + 1]} , column {NUMBER_WORDS[column + 1]}"
        if family == "color":
            return f"what color is the shape in {where} ?", color
        return f"what shape is in {where} ?", shape
    if family == "count":
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            count = sum(item[3] == shape for item in scene)
            return f"how many {shape}s are there ?", NUMBER_WORDS[count]
        color = rng.choice(list(COLORS))
        count = sum(item[2] == color for item in scene)
        return f"how many {color} shapes are there ?", NUMBER_WORDS[count]
    present = {(item[2], item[3]) for item in scene}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
    return f"is there a {color} {shape} ?", "yes" if (color, shape) in present else "no"


def _caption(scene: list[tuple[int, int, str, str]]) -> str:
    """Every shape in reading order: "red circle in row one , column two . blue square in ..."."""
    return " ".join(f"{color} {shape} in row {NUMBER_WORDS[row + 1]} , column {NUMBER_WORDS[column + 1]} ."
                    for row, column, color, shape in scene)


def _make_split(out_dir: str, split: str, count: int, seed: int, image_size: int, grid: int,
                questions: int = 1, caption: bool = False) -> list[dict]:
    rng = random.Random(f"epic-shapes/{seed}/{split}")  # str seeds hash with sha512: stable across runs
    cells = [(row, column) for row in range(grid) for column in range(grid)]
    most = min(6, len(cells))
    records = []
    for index in range(count):
        placed = rng.sample(cells, rng.randint(min(2, most), most))
        scene = sorted((row, column, rng.choice(list(COLORS)), rng.choice(SHAPES)) for row, column in placed)
        families = [FAMILIES[(index + turn) % len(FAMILIES)] for turn in range(questions)]
        turns = [_question(scene, family, rng) for family in families]
        if caption:
            turns.append((CAPTION_QUESTION, _caption(scene)))
            families.append("describe")
        name = f"images/{split}_{index:06d}.png"
        _draw_scene(scene, image_size, grid).save(os.path.join(out_dir, name), format="PNG", compress_level=1)
        conversations = []
        for turn, (question, answer) in enumerate(turns):
            conversations += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if turn == 0 else question},
                              {"from": "gpt", "value": answer}]
        record = {"id": f"{split}-{index:06d}", "image": name, "family": families[0], "answer": turns[0][1],
                  "conversations": conversations}
        if len(turns) > 1:
            record["families"] = families
        records.append(record)
    return records


def make_shapes_task(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int, seed: int = 0,
                     image_size: int = 56, grid: int = 3, train_questions: int = 1,
                     train_caption: bool = False) -> dict[str, str]:
    """Writes the shapes visual-QA task: PNGs under out_dir/images and one LLaVA-format JSON per split.

    Args:
        out_dir: destination folder (created; also the image folder for `LlavaDataset`).
        n_train, n_val, n_test: number of records (one image, one question each) per split.
        seed: the same seed writes byte-identical files; each split draws from its own seed, so splits differ.
        image_size: canvas side in pixels.
        grid: grid x grid cells (2..9); each image holds 2..min(6, grid^2) shapes, one per cell.
        train_questions: questions per training image (1..8; the families in turn from the record's own): a
            multi-turn conversation, every answer supervised (the record's "families" lists each turn's).
        train_caption: a last training turn "describe the image ." answered with every shape, its colour and its
            cell in reading order (dense supervision, as LLaVA's caption pre-training; family "describe").
            Validation and test records ask one question each, never the caption.

    Returns:
        split name ("train", "val", "test") -> path of its JSON file (a list of records with id, image (relative
        to out_dir), conversations, family and answer).
    """
    if not 2 <= grid <= 9:
        raise ValueError(f"grid must be in 2..9 (rows are named one..nine), got {grid}")
    if not 1 <= train_questions <= 8:
        raise ValueError(f"train_questions must be in 1..8, got {train_questions}")
    if image_size < 2 * grid:
        raise ValueError(f"image_size {image_size} is too small for a {grid}x{grid} grid")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {}
    for split, count in zip(_SPLITS, (n_train, n_val, n_test)):
        records = _make_split(out_dir, split, count, seed, image_size, grid,
                              questions=train_questions if split == "train" else 1,
                              caption=train_caption and split == "train")
        paths[split] = os.path.join(out_dir, f"{split}.json")
        with open(paths[split], "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
            handle.write("\n")
        logger.info("shapes task: %d %s records -> %s", count, split, paths[split])
    return paths
