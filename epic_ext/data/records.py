"""LLaVA-format records, shared by training and evaluation: reading and checking a JSON / JSONL file, the
placeholders a record's images and video need, and the skip policy's reasons and pre-scan.

A record is ``{"id": ..., "image": None | "a.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human",
"value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}, ...]}`` (LLaVA-665K style); the chat-template
families (epic_ext.data.chat) also take ``"video": ["f0.jpg", "f1.jpg", ...]`` (frames in time order, one
``<video>`` placeholder).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_ROLES = ("human", "gpt")


# Per-image (per-video, per-sample) tensors of the chat-template families, concatenated over a batch in sample order
# (LLaVA-NeXT: image_sizes [n_images, 2]; LLaVA-OneVision: image_sizes and batch_num_images [1] per sample, 0
# without images).
GRID_KEYS = ("image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "image_sizes",
             "batch_num_images")
# Why a sample can be skipped (LlavaDataset.skipped keys), in the order reports list them.
SKIP_REASONS = ("missing_image", "corrupt_image", "bad_record", "too_long", "no_labels")


class ImageLoadError(OSError):
    """An image of a record could not be read (missing file or undecodable bytes)."""


def image_names(record: dict) -> list[str]:
    """The record's image paths as written in it (none, one string, or a list)."""
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def video_frames(record: dict) -> list[str]:
    """The record's video frame paths (a `video` field: a list of image files, in time order), or []."""
    return list(record.get("video") or [])


def placeholder_problem(conversations: list[dict], n_images: int, n_videos: int = 0) -> str | None:
    """Why the record's ``<image>`` / ``<video>`` placeholders do not fit its images and video (None when they do).
    Placeholders of a kind may be left out entirely: the prompt then gets them before the first human turn."""
    has_human = any(turn["from"] == "human" for turn in conversations)
    for placeholder, expected, what in ((IMAGE_PLACEHOLDER, n_images, "images"), (VIDEO_PLACEHOLDER, n_videos,
                                                                                   "videos")):
        count = sum(turn["value"].count(placeholder) for turn in conversations)
        if count == 0 and expected and has_human:
            count = expected
        if count != expected:
            return f"{count} {placeholder} placeholders for {expected} {what}"
    return None


def scan_records(records: Sequence[dict], image_folder: str | os.PathLike | None, *,
                 on_bad_image: str = "skip") -> Counter:
    """Predicts, without decoding images or tokenizing, which records a LlavaDataset would skip: missing image
    files, placeholders that do not fit the images, and records with no gpt turn (nothing to supervise).
    Corrupt images and samples too long for max_length are only found when the samples are built.

    Args:
        records: LLaVA-format records (see `load_records`).
        image_folder: folder the records' relative image paths start from.
        on_bad_image: "error" raises ImageLoadError / ValueError at the first bad record, as the dataset would.

    Returns:
        reason -> number of records (one reason per record).
    """
    folder = os.fspath(image_folder) if image_folder is not None else ""
    skipped: Counter = Counter()
    for index, record in enumerate(records):
        sample_id = record.get("id", index)
        names = image_names(record) + video_frames(record)
        problem = placeholder_problem(record["conversations"], len(image_names(record)),
                                      int(bool(video_frames(record))))
        if problem is not None:
            if on_bad_image == "error":
                raise ValueError(f"record {sample_id!r} (index {index}): {problem}")
            skipped["bad_record"] += 1
            continue
        missing = next((name for name in names if not os.path.isfile(os.path.join(folder, name))), None)
        if missing is not None:
            if on_bad_image == "error":
                raise ImageLoadError(f"image file {os.path.join(folder, missing)} of record {sample_id!r} "
                                     f"(index {index}) is missing")
            skipped["missing_image"] += 1
        elif not any(turn["from"] == "gpt" for turn in record["conversations"]):
            skipped["no_labels"] += 1
    return skipped


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    name = f"{where} (id {record['id']!r})" if "id" in record else where
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{name}: missing or empty 'conversations' list")
    for turn_index, turn in enumerate(conversations):
        if (not isinstance(turn, dict) or turn.get("from") not in _ROLES
                or not isinstance(turn.get("value"), str)):
            raise ValueError(f"{name}: conversations[{turn_index}] must be "
                             f'{{"from": "human"|"gpt", "value": str}}, got {turn!r}')
    image = record.get("image")
    if image is not None and not isinstance(image, str) and not (
            isinstance(image, list) and all(isinstance(item, str) for item in image)):
        raise ValueError(f"{name}: 'image' must be a string or a list of strings, got {image!r}")
    video = record.get("video")
    if video is not None and not (isinstance(video, list) and video and all(isinstance(f, str) for f in video)):
        raise ValueError(f"{name}: 'video' must be a non-empty list of frame image files, got {video!r}")


def load_records(path: str | os.PathLike) -> list[dict]:
    """Reads LLaVA-format records from a JSON list file or a JSONL file (one object a line, blank lines allowed).

    Args:
        path: the .json / .jsonl file. A file whose first non-blank character is ``[`` is read as one JSON list.

    Returns:
        The records, in file order, each checked: ``conversations`` is a non-empty list of
        ``{"from": "human"|"gpt", "value": str}`` and ``image`` is absent, a string or a list of strings.

    Raises:
        ValueError: malformed JSON (naming the file and the 1-based line number) or a malformed record (naming
            its id, or its index when it has none).
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    records: list[tuple[Any, str]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from error
        records = [(record, f"{path}: record {index}") for index, record in enumerate(data)]
    else:
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number}: invalid JSON ({error.msg})") from error
            records.append((record, f"{path}: line {line_number} (record {len(records)})"))
    for record, where in records:
        _check_record(record, where)
    return [record for record, _ in records]
