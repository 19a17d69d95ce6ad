"""LLaVA-format supervised data: records, the llava-1.5 prompt, label masks, images and batches.

A record is ``{"id": ..., "image": None | "a.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human",
"value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}, ...]}`` (LLaVA-665K style); the chat-template
families (epic_ext.data.chat) also take ``"video": ["f0.jpg", "f1.jpg", ...]`` (frames in time order, one
``<video>`` placeholder).

The prompt is the llava-1.5-hf one (also LLaVA-NeXT-Vicuna's): ``<s>USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2
ASSISTANT: A2</s>``. Every ``<image>`` placeholder is expanded with the processor's own ``replace_image_token`` (the
string ``processor.__call__`` would insert: LlavaProcessor's ``image_seq_length`` image tokens per image;
LlavaNextProcessor's per-image count from the image size, base crop + unpadded anyres grid + one newline slot per
row) and the whole text is tokenized once, so ``input_ids`` equal what ``processor(text=..., images=...)`` produces
for the same prompt. LLaVA-NeXT's images come as [n_images, crops, C, S, S] (crops padded to the sample's most) with
``image_sizes`` [n_images, 2].
Labels are -100 except on the tokens of the gpt answers and their eos token, found from the tokenizer's offset
mapping.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .records import (GRID_KEYS, IGNORE_INDEX, IMAGE_PLACEHOLDER, ImageLoadError, image_names, placeholder_problem,
                      video_frames)

logger = logging.getLogger(__name__)

# The CLIP mean colour, as LLaVA pads non-square images (expand2square).
LLAVA_BACKGROUND = (122, 116, 104)


def expand_to_square(image, background: tuple[int, int, int] = LLAVA_BACKGROUND):
    """Pads a PIL image to a centred square of side max(width, height) filled with `background` (LLaVA's
    expand2square). A square image is returned unchanged."""
    from PIL import Image  # noqa: PLC0415

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenized, label-masked LLaVA samples with their images.

    Args:
        records: LLaVA-format records (see `load_records`).
        image_folder: folder the records' relative image paths start from.
        processor: a LlavaProcessor or LlavaNextProcessor (fast tokenizer with offsets preferred; image processor;
            image_token; replace_image_token).
        max_length: longest input_ids kept; longer samples lose their END (the answers last). A sample whose
            cut would fall inside or before its last image-token block is skipped ("too_long").
        pad_to_square: pad each image to a square with `background` before the image processor (LLaVA's "pad").
        on_bad_image: "skip" (return None, count the reason in `skipped`, log a warning) or "error" (raise
            ImageLoadError naming the file and the record) for missing or undecodable images; the same policy
            applies to records whose ``<image>`` placeholders do not match their images ("bad_record").
        background: RGB padding colour for `pad_to_square`.

    ``dataset[i]`` is None for a skipped sample, otherwise a dict with input_ids LongTensor [L], labels LongTensor
    [L] (-100 off the answers), pixel_values FloatTensor [n_images, 3, H, W] (LLaVA-NeXT: [n_images, crops, 3, S, S]
    and image_sizes LongTensor [n_images, 2] (height, width)) or None (text-only), id.
    Skips are counted once per sample (``skipped``: reason -> count; ``skipped_ids``: reason -> ids); with
    DataLoader workers each worker holds its own counts.
    """

    def __init__(self, records: Sequence[dict], image_folder: str | os.PathLike | None, processor, *,
                 max_length: int = 2048, pad_to_square: bool = False, on_bad_image: str = "skip",
                 background: tuple[int, int, int] = LLAVA_BACKGROUND):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.records = list(records)
        self.image_folder = os.fspath(image_folder) if image_folder is not None else ""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        self.on_bad_image = on_bad_image
        self.background = tuple(background)
        self.image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self._skipped: dict[int, tuple[str, Any]] = {}
        self._visited: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> Counter:
        """reason -> number of distinct samples skipped for it."""
        return Counter(reason for reason, _ in self._skipped.values())

    @property
    def visited(self) -> int:
        """Number of distinct samples built or skipped so far."""
        return len(self._visited)

    @property
    def skipped_ids(self) -> dict[str, list]:
        """reason -> ids of the skipped samples, in dataset order."""
        by_reason: dict[str, list] = {}
        for index in sorted(self._skipped):
            reason, sample_id = self._skipped[index]
            by_reason.setdefault(reason, []).append(sample_id)
        return by_reason

    def _skip(self, index: int, sample_id: Any, reason: str, detail: str) -> None:
        if index not in self._skipped:
            logger.warning("skipping sample %r (record %d): %s: %s", sample_id, index, reason, detail)
        self._skipped[index] = (reason, sample_id)

    def _image_paths(self, record: dict) -> list[str]:
        """Every image file the sample loads (the model's images, then any video frames)."""
        return [os.path.join(self.image_folder, name) for name in image_names(record) + video_frames(record)]

    def _record_problem(self, record: dict) -> str | None:
        if video_frames(record):
            return "a video record: LLaVA-1.5 and LLaVA-NeXT take images only"
        return placeholder_problem(record["conversations"], len(image_names(record)))

    def _load_image(self, path: str, sample_id: Any, index: int):
        from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except FileNotFoundError as error:
            raise ImageLoadError(f"image file {path} of record {sample_id!r} (index {index}) is missing") from error
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise ImageLoadError(
                f"image file {path} of record {sample_id!r} (index {index}) cannot be decoded: {error}") from error
        return expand_to_square(image, self.background) if self.pad_to_square else image

    def _prompt(self, conversations: list[dict], n_images: int) -> list[tuple[str, bool]]:
        """The prompt as (text piece, supervised) pairs."""
        eos = self.tokenizer.eos_token or ""
        values = [turn["value"] for turn in conversations]
        if n_images and not any(IMAGE_PLACEHOLDER in value for value in values):
            first_human = next((i for i, turn in enumerate(conversations) if turn["from"] == "human"), None)
            if first_human is not None:
                values[first_human] = (IMAGE_PLACEHOLDER + "\n") * n_images + values[first_human]
        pieces = []
        for turn, value in zip(conversations, values):
            if turn["from"] == "human":
                pieces.append(("USER: " + value + " ASSISTANT:", False))
            else:
                pieces.append((" ", False))
                pieces.append((value + eos, True))
        return pieces

    def _tokenize(self, pieces: list[tuple[str, bool]], image_texts: list[str]) -> tuple[list[int], list[int]]:
        """input_ids and labels of the prompt pieces with the placeholders replaced by `image_texts`."""
        replacements = iter(image_texts)
        text, spans = "", []
        for piece, supervised in pieces:
            parts = piece.split(IMAGE_PLACEHOLDER)
            expanded = parts[0] + "".join(next(replacements) + part for part in parts[1:])
            if supervised:
                spans.append((len(text), len(text) + len(expanded)))
            text += expanded
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            input_ids = list(encoded["input_ids"])
            # A token overlapping an answer is supervised: a sentencepiece "▁yes" may start at the space.
            labels = [token if any(begin < end and finish > start for start, end in spans) else IGNORE_INDEX
                      for token, (begin, finish) in zip(input_ids, encoded["offset_mapping"])]
        else:  # no offsets: tokenize the supervised and unsupervised stretches one by one
            input_ids, labels, position = [], [], 0
            for start, end in [*spans, (len(text), len(text))]:
                for chunk, supervised in ((text[position:start], False), (text[start:end], True)):
                    ids = self.tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else []
                    input_ids += ids
                    labels += ids if supervised else [IGNORE_INDEX] * len(ids)
                position = end
        labels = [IGNORE_INDEX if token == self.image_token_id else label for token, label in zip(input_ids, labels)]
        bos = self.tokenizer.bos_token_id
        if bos is not None:
            input_ids, labels = [bos, *input_ids], [IGNORE_INDEX, *labels]
        return input_ids, labels

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        sample_id = record.get("id", index)
        self._visited.add(index)
        paths = self._image_paths(record)
        detail = self._record_problem(record)
        if detail is not None:
            if self.on_bad_image == "error":
                raise ValueError(f"record {sample_id!r} (index {index}): {detail}")
            self._skip(index, sample_id, "bad_record", detail)
            return None
        images = []
        for path in paths:
            try:
                images.append(self._load_image(path, sample_id, index))
            except ImageLoadError as error:
                if self.on_bad_image == "error":
                    raise
                missing = isinstance(error.__cause__, FileNotFoundError)
                self._skip(index, sample_id, "missing_image" if missing else "corrupt_image", str(error))
                return None
        input_ids, labels, visual_inputs = self._encode(record, images)
        if len(input_ids) > self.max_length:
            image_positions = [i for i, token in enumerate(input_ids) if token in self.visual_token_ids]
            if image_positions and image_positions[-1] >= self.max_length:
                self._skip(index, sample_id, "too_long",
                           f"{len(input_ids)} tokens, last image token at {image_positions[-1]}, "
                           f"max_length {self.max_length}")
                return None
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            self._skip(index, sample_id, "no_labels", f"no supervised token in {len(input_ids)} tokens")
            return None
        sample = dict(input_ids=torch.tensor(input_ids, dtype=torch.long),
                      labels=torch.tensor(labels, dtype=torch.long), pixel_values=None, id=sample_id)
        sample.update(visual_inputs)
        return sample

    @property
    def visual_token_ids(self) -> frozenset[int]:
        """Ids of the visual placeholder tokens (a cut of a too-long sample must not fall before the last one)."""
        return frozenset({self.image_token_id})

    def _encode(self, record: dict, images: list) -> tuple[list[int], list[int], dict]:
        """(input_ids, labels, the model's visual inputs) of a record whose images are loaded."""
        pieces = self._prompt(record["conversations"], len(images))
        visual: dict = {"pixel_values": None}
        image_texts = []
        if images:
            image_processor = self.processor.image_processor
            # LLaVA-NeXT: crops padded to the sample's most, as LlavaNextProcessor.__call__ asks (do_pad=True)
            anyres = "image_sizes" in getattr(image_processor, "model_input_names", ())
            processed = image_processor(images, return_tensors="pt", **({"do_pad": True} if anyres else {}))
            visual["pixel_values"] = processed["pixel_values"].to(torch.float32)
            if "image_sizes" in processed:  # LLaVA-NeXT: [n, crops, C, S, S] and each image's (height, width)
                visual["image_sizes"] = torch.as_tensor(processed["image_sizes"]).to(torch.long).reshape(-1, 2)
            image_texts = [self.processor.replace_image_token(processed, image_idx=i) for i in range(len(images))]
        input_ids, labels = self._tokenize(pieces, image_texts)
        return input_ids, labels, visual


def collate(batch: Sequence[dict | None], pad_token_id: int, padding_side: str = "right") -> dict | None:
    """Pads samples of `LlavaDataset` into a batch, dropping skipped (None) samples.

    Args:
        batch: samples from `LlavaDataset.__getitem__` (None entries are dropped).
        pad_token_id: the id input_ids are padded with (labels are padded with -100).
        padding_side: "right" (training) or "left" (generation).

    Returns:
        None if every sample is None, else a dict with input_ids LongTensor [B, L], attention_mask LongTensor
        [B, L] (1 real, 0 pad), labels LongTensor [B, L], pixel_values FloatTensor [total images, 3, H, W] (all
        samples' images concatenated in batch order, the order LlavaForConditionalGeneration consumes them;
        LLaVA-NeXT / LLaVA-OneVision: [total images, most crops, 3, S, S]) or None when no sample has an image,
        and ids (list);
        the GRID_KEYS present, concatenated.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    samples = [sample for sample in batch if sample is not None]
    if not samples:
        return None
    length = max(sample["input_ids"].numel() for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample["input_ids"].numel()
        columns = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, columns] = sample["input_ids"]
        labels[row, columns] = sample["labels"]
        attention_mask[row, columns] = 1
    images = [sample["pixel_values"] for sample in samples if sample["pixel_values"] is not None]
    if images and images[0].dim() == 5:  # NeXT / OneVision [n, crops, C, S, S]: crops padded to the batch's most
        from .onevision import pad_crops  # noqa: PLC0415

        pixel_values = pad_crops(images)
    else:
        pixel_values = torch.cat(images) if images else None
    out = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
               ids=[sample["id"] for sample in samples])
    # chat-template families: token types padded like input_ids (0 = text), per-image grids concatenated in order
    if any("mm_token_type_ids" in sample for sample in samples):
        token_types = torch.zeros((len(samples), length), dtype=torch.int)
        for row, sample in enumerate(samples):
            n = sample["input_ids"].numel()
            columns = slice(0, n) if padding_side == "right" else slice(length - n, length)
            token_types[row, columns] = sample["mm_token_type_ids"]
        out["mm_token_type_ids"] = token_types
    for key in GRID_KEYS:
        grids = [sample[key] for sample in samples if sample.get(key) is not None]
        if grids and key == "pixel_values_videos" and grids[0].dim() == 5:  # LLaVA-OneVision [1, frames, C, S, S]
            from .onevision import stack_videos  # noqa: PLC0415

            out[key] = stack_videos(grids)
        elif grids:
            out[key] = torch.cat(grids)
    return out


class LlavaCollator:
    """`collate` with its padding settings bound, picklable for DataLoader workers.

    Args:
        pad_token_id: the id input_ids are padded with.
        padding_side: "right" or "left".
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, batch: Sequence[dict | None]) -> dict | None:
        """Returns: `collate(batch, self.pad_token_id, self.padding_side)`."""
        return collate(batch, self.pad_token_id, self.padding_side)
