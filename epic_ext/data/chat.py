"""Supervised samples of the chat-template families (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) from LLaVA-format
records.

The record format is LLaVA's (`epic_ext.data.records`): human / gpt turns, ``<image>`` placeholders (added before the
first human turn's text when a record has images but none). Each conversation becomes chat messages
(``{"role": "user" | "assistant", "content": [{"type": "image"}, {"type": "text", "text": ...}]}``) rendered by the
checkpoint's own chat template, so the prompt is exactly what the model was tuned on (system prompt, role markers,
the template's vision markers around each image).

Supervised: the text of every gpt answer and the end-of-turn token right after it (Qwen: ``<|im_end|>``), nothing
else. The answers are found by rendering the conversation turn by turn: the text the template adds for an answer
is what follows the rendering of the turns before it with the generation prompt (``<|im_start|>assistant\\n``).

Images go through the checkpoint's image processor (dynamic resolution: each image gets its own patch grid); each
image placeholder the template wrote is expanded to grid_t * grid_h * grid_w / merge_size^2 copies, the rule of the
Qwen processors (LLaVA-OneVision: anyres crops, counted in onevision.py), and the text is tokenized once with
offsets.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .llava import LlavaDataset
from .records import IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, image_names, placeholder_problem
from .records import video_frames as video_frame_names

QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_VIDEO_TOKEN = "<|video_pad|>"
ONEVISION_IMAGE_TOKEN = "<image>"
ONEVISION_VIDEO_TOKEN = "<video>"
DEFAULT_VIDEO_FPS = 2.0  # frames per second of a record's frame list without an "fps" field (Qwen's sampling rate)


@dataclass
class ChatProcessor:
    """What a chat-template family needs to build samples: the tokenizer (with the chat template), the image
    processor, and the checkpoint directory the processor files are exported from.

    Attributes:
        tokenizer: a fast tokenizer (offsets are used to find the answers).
        image_processor: the checkpoint's image processor (pixel_values + image_grid_thw).
        chat_template: the Jinja template (the tokenizer's, else the checkpoint's chat_template.jinja / .json).
        source: the checkpoint directory; `save_pretrained` copies its processor files.
        image_token: the placeholder each image's template marker holds (Qwen: ``<|image_pad|>``).
        video_token: the same for a video (Qwen: ``<|video_pad|>``).
        videos: whether the family takes video records here (Qwen2.5-VL; not Qwen3-VL, whose prompts carry
            per-frame timestamps this module does not write).
        layout: LLaVA-OneVision's token-count rule (onevision.OnevisionLayout, from the model config); None
            for the Qwen families.
        video_normalize: LLaVA-OneVision: image_mean / image_std of the checkpoint's video_preprocessor_config.json
            (None: the image processor's).
    """

    tokenizer: Any
    image_processor: Any
    chat_template: str
    source: str
    image_token: str = QWEN_IMAGE_TOKEN
    video_token: str = QWEN_VIDEO_TOKEN
    videos: bool = True
    layout: Any = None
    video_normalize: dict | None = None

    @classmethod
    def from_pretrained(cls, path: str, *, image_processor, videos: bool = True,
                        onevision_config=None) -> ChatProcessor:
        """Loads the tokenizer and chat template of a checkpoint directory. The family (epic_ext.models.families)
        supplies what depends on it: the image processor it loaded, whether it takes video records here, and, for
        LLaVA-OneVision, the model config its token-count layout comes from (with the video processor's
        normalisation from video_preprocessor_config.json when the checkpoint has one).

        Raises:
            ValueError: no chat template in the checkpoint, a slow tokenizer (no offsets), or a tokenizer without
                the image token.
        """
        from transformers import AutoTokenizer  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is needed to find the answers' tokens")
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            for name in ("chat_template.jinja", "chat_template.json"):
                candidate = os.path.join(path, name)
                if os.path.isfile(candidate):
                    with open(candidate, encoding="utf-8") as handle:
                        text = handle.read()
                    template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                    break
        if not template:
            raise ValueError(f"{path}: no chat template (tokenizer_config.json, chat_template.jinja or "
                             "chat_template.json)")
        layout, image_token, video_token, video_normalize = None, QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, None
        if onevision_config is not None:
            from .onevision import OnevisionLayout  # noqa: PLC0415

            layout, image_token, video_token = (OnevisionLayout.from_config(onevision_config),
                                                ONEVISION_IMAGE_TOKEN, ONEVISION_VIDEO_TOKEN)
            video_config = os.path.join(path, "video_preprocessor_config.json")
            if os.path.isfile(video_config):
                with open(video_config, encoding="utf-8") as handle:
                    settings = json.load(handle)
                video_normalize = {key: [float(v) for v in settings[key]] for key in ("image_mean", "image_std")
                                   if isinstance(settings.get(key), list)}
        image_token = getattr(tokenizer, "image_token", None) or image_token
        if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"{path}: the tokenizer has no {image_token} token")
        return cls(tokenizer=tokenizer, image_processor=image_processor, chat_template=template, source=path,
                   image_token=image_token, video_token=getattr(tokenizer, "video_token", None) or video_token,
                   videos=videos, layout=layout, video_normalize=video_normalize)

    def save_pretrained(self, target: str | os.PathLike) -> None:
        """Copies the checkpoint's processor files (everything but the weights and the model / generation config)
        into `target`, so AutoProcessor / AutoTokenizer load there exactly what training used. A source that is
        not a local directory (a Hub id): the tokenizer and image processor are saved, with the chat template."""
        import shutil  # noqa: PLC0415

        os.makedirs(target, exist_ok=True)
        if not os.path.isdir(self.source):
            self.tokenizer.save_pretrained(os.fspath(target))
            self.image_processor.save_pretrained(os.fspath(target))
            with open(os.path.join(target, "chat_template.jinja"), "w", encoding="utf-8") as handle:
                handle.write(self.chat_template)
            return
        skip_names = {"config.json", "generation_config.json", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json"}
        for name in sorted(os.listdir(self.source)):
            source = os.path.join(self.source, name)
            if (not os.path.isfile(source) or name in skip_names or name.endswith((".safetensors", ".bin", ".pt"))
                    or name.startswith("training_args")):
                continue
            shutil.copyfile(source, os.path.join(target, name))

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.video_token)

    def video_inputs(self, frames: list, fps: float = DEFAULT_VIDEO_FPS) -> tuple[dict, int]:
        """One video from its frames (PIL images, time order), laid out as Qwen2.5-VL's video processor lays it out:
        every frame resized like an image (the image processor's size budget) and normalised, the frame count
        padded to a multiple of temporal_patch_size by repeating the last frame, and each patch holding
        temporal_patch_size consecutive frames (rows in (t, h / m, w / m, m, m) order, values (C, t, p, p)).

        Returns:
            ({"pixel_values_videos": [t * h * w, C * tp * p * p] float32, "video_grid_thw": [1, 3] int64,
            "second_per_grid_ts": [1] float32 (tp / fps)}, the video's visual tokens t * h * w / merge_size^2).
            LLaVA-OneVision: see onevision.onevision_video_inputs (fps unused).
        """
        if self.layout is not None:
            from .onevision import onevision_video_inputs  # noqa: PLC0415

            return onevision_video_inputs(self.image_processor, self.layout, frames, self.video_normalize)
        if not frames:
            raise ValueError("video_inputs: a video needs at least one frame")
        if not fps > 0:
            raise ValueError(f"video_inputs: fps must be > 0, got {fps}")
        size = frames[0].size
        frames = [frame if frame.size == size else frame.resize(size) for frame in frames]
        temporal = int(self.image_processor.temporal_patch_size)
        frames = frames + [frames[-1]] * (-len(frames) % temporal)
        per_frame, _ = self.visual_inputs(frames)  # each frame as an image: patches repeat it temporal times
        grid = per_frame["image_grid_thw"][0]
        rows = int(grid[1] * grid[2])
        channels_time_patch = per_frame["pixel_values"].shape[1]  # C * t * p * p, stored as (C, t, p, p)
        pixels = int(self.image_processor.patch_size) ** 2
        channels = channels_time_patch // (temporal * pixels)
        patches = per_frame["pixel_values"].view(len(frames), rows, channels, temporal, pixels)
        first_slot = patches[:, :, :, 0]  # [T, rows, C, p * p]: the frame itself
        groups = first_slot.view(len(frames) // temporal, temporal, rows, channels, -1)
        video = groups.permute(0, 2, 3, 1, 4).reshape(len(frames) // temporal * rows, channels_time_patch)
        video_grid = torch.tensor([[len(frames) // temporal, int(grid[1]), int(grid[2])]], dtype=torch.long)
        merge = self.image_processor.merge_size
        return ({"pixel_values_videos": video.contiguous(), "video_grid_thw": video_grid,
                 "second_per_grid_ts": torch.tensor([temporal / fps], dtype=torch.float32)},
                int(video_grid.prod()) // merge ** 2)

    def visual_inputs(self, images: list) -> tuple[dict, list[int]]:
        """({"pixel_values": [n_patches, C*t*p*p] float32, "image_grid_thw": [n, 3] int64} (None without images),
        the visual tokens of each image: grid_t * grid_h * grid_w / merge_size^2). LLaVA-OneVision: see
        onevision.onevision_visual_inputs.

        Raises:
            ValueError: an image processor without merge_size (not a Qwen-VL one).
        """
        if self.layout is not None:
            from .onevision import onevision_visual_inputs  # noqa: PLC0415

            return onevision_visual_inputs(self.image_processor, self.layout, images)
        if not images:
            return {"pixel_values": None, "image_grid_thw": None}, []
        merge = getattr(self.image_processor, "merge_size", None)
        if not isinstance(merge, int) or merge < 1:
            raise ValueError(f"the image processor ({type(self.image_processor).__name__}) has no merge_size: "
                             "not a Qwen-VL image processor")
        processed = self.image_processor(images=images, return_tensors="pt")
        grids = processed["image_grid_thw"].to(torch.long)
        visual = {"pixel_values": processed["pixel_values"].to(torch.float32), "image_grid_thw": grids}
        return visual, [int(grid.prod()) // merge ** 2 for grid in grids]

    def prompt_batch(self, conversations: list[list[dict]], images: list[list], *, padding_side: str = "left",
                     videos: list[tuple[list, float] | None] | None = None):
        """Generation inputs: each conversation (LLaVA turns ending with a human turn) rendered with the generation
        prompt, image (and video) placeholders expanded; padded into one batch (`epic_ext.data.llava.collate` keys,
        labels all -100).

        Args:
            conversations: per item, its LLaVA turns.
            images: per item, its PIL images (in placeholder order).
            videos: per item, None or (its video's frames as PIL images, frames per second); see video_inputs.
        """
        from .llava import collate  # noqa: PLC0415

        samples = []
        videos = videos or [None] * len(conversations)
        for index, (turns, item_images, video) in enumerate(zip(conversations, images, videos, strict=True)):
            text = self.render(conversation_messages(turns, len(item_images), int(video is not None)),
                               add_generation_prompt=True)
            visual, counts = self.visual_inputs(item_images)
            text, _ = expand_placeholders(text, self.image_token, counts, [])
            if video is not None:
                video_visual, video_tokens = self.video_inputs(*video)
                visual.update(video_visual)
                text, _ = expand_placeholders(text, self.video_token, [video_tokens], [], what="videos")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.layout is None:  # Qwen's M-RoPE positions read the token types
                visual["mm_token_type_ids"] = torch.tensor(
                    [1 if t == self.image_token_id else 2 if t == self.video_token_id else 0 for t in ids],
                    dtype=torch.int)
            samples.append(dict(input_ids=torch.tensor(ids, dtype=torch.long),
                                labels=torch.full((len(ids),), IGNORE_INDEX, dtype=torch.long), id=index, **visual))
        return collate(samples, self.tokenizer.pad_token_id, padding_side=padding_side)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def conversation_messages(conversations: list[dict], n_images: int, n_videos: int = 0) -> list[dict]:
    """LLaVA turns -> chat messages. ``<image>`` / ``<video>`` placeholders become {"type": "image"} /
    {"type": "video"} entries where they stand (the newline LLaVA writes after a placeholder is dropped); a record
    with images (a video) and no placeholder of that kind gets them before the first human turn's text, the video
    first."""
    values = [turn["value"] for turn in conversations]
    first_human = next((i for i, turn in enumerate(conversations) if turn["from"] == "human"), None)
    for placeholder, count in ((IMAGE_PLACEHOLDER, n_images), (VIDEO_PLACEHOLDER, n_videos)):
        if count and first_human is not None and not any(placeholder in value for value in values):
            values[first_human] = placeholder * count + values[first_human]
    split = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
    messages = []
    for turn, value in zip(conversations, values):
        if turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
            continue
        content, after_placeholder = [], False
        for part in split.split(value):
            if part in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                content.append({"type": "image" if part == IMAGE_PLACEHOLDER else "video"})
                after_placeholder = True
                continue
            if after_placeholder:
                part = part.removeprefix("\n")
            after_placeholder = False
            if part:
                content.append({"type": "text", "text": part})
        messages.append({"role": "user", "content": content})
    return messages


def answer_spans(processor: ChatProcessor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span of every assistant answer in it).

    Raises:
        ValueError: a template that does not render the conversation turn by turn (each rendering a prefix of the
            next) or does not write an answer verbatim.
    """
    text = processor.render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = processor.render(messages[:index], add_generation_prompt=True)
        through = processor.render(messages[: index + 1])
        if not through.startswith(prefix) or not text.startswith(through):
            raise ValueError("the chat template does not render the conversation turn by turn (the rendering of "
                             f"the turns before answer {len(spans) + 1} plus the generation prompt is not a prefix "
                             "of the full rendering): its answers cannot be located")
        answer = message["content"][0]["text"]
        start = through.find(answer, len(prefix)) if answer else len(prefix)
        if start < 0 and answer.strip():
            answer = answer.strip()
            start = through.find(answer, len(prefix))
        if start < 0:
            raise ValueError(f"the chat template does not write answer {len(spans) + 1} ({answer[:40]!r}) verbatim")
        spans.append((start, start + len(answer)))
    return text, spans


def expand_placeholders(text: str, token: str, counts: list[int], spans: list[tuple[int, int]],
                        what: str = "images") -> tuple[str, list[tuple[int, int]]]:
    """Replaces the i-th `token` in text by counts[i] copies; returns the new text and the spans moved with it.

    Raises:
        ValueError: the text holds another number of `token` than len(counts).
    """
    found = text.count(token)
    if found != len(counts):
        raise ValueError(f"the chat template wrote {found} {token} placeholders for {len(counts)} {what}")
    pieces, shifts, position = [], [], 0
    for count in counts:
        at = text.index(token, position)
        pieces += [text[position:at], token * count]
        shifts.append((at, len(token) * (count - 1)))
        position = at + len(token)
    pieces.append(text[position:])

    def moved(offset: int) -> int:
        return offset + sum(shift for at, shift in shifts if at < offset)

    return "".join(pieces), [(moved(start), moved(end)) for start, end in spans]


class ChatDataset(LlavaDataset):
    """Tokenized, label-masked samples of a chat-template family (same records, skips and truncation as
    `LlavaDataset`).

    Args:
        records, image_folder, max_length, pad_to_square, on_bad_image, background: as for LlavaDataset.
        processor: a ChatProcessor.

    ``dataset[i]`` is None for a skipped sample, otherwise a dict with input_ids LongTensor [L], labels LongTensor
    [L] (-100 except on the answers and their end-of-turn token), mm_token_type_ids IntTensor [L] (1 at image
    tokens, 2 at video tokens, else 0), pixel_values FloatTensor [n_patches, C * t * p * p] and image_grid_thw
    LongTensor [n_images, 3] (both None without images), for a record with a ``video``: pixel_values_videos,
    video_grid_thw [1, 3] and second_per_grid_ts [1] (see ChatProcessor.video_inputs; the record's "fps", default
    2), id. LLaVA-OneVision instead: no mm_token_type_ids, pixel_values [n_images, crops, C, S, S], image_sizes
    [n_images, 2], batch_num_images [1], pixel_values_videos [1, frames, C, S, S] (onevision.py).
    """

    def __init__(self, records, image_folder, processor: ChatProcessor, **kwargs):
        super().__init__(records, image_folder, processor, **kwargs)
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id

    @property
    def visual_token_ids(self) -> frozenset[int]:
        return frozenset({self.image_token_id, self.processor.video_token_id})

    def _record_problem(self, record: dict) -> str | None:
        if video_frame_names(record) and not self.processor.videos:
            return "a video record: this model family takes images only here"
        return placeholder_problem(record["conversations"], len(image_names(record)),
                                   int(bool(video_frame_names(record))))

    def _encode(self, record: dict, images: list) -> tuple[list[int], list[int], dict]:
        n_images = len(image_names(record))
        images, frames = images[:n_images], images[n_images:]  # _image_paths: the images, then the video frames
        messages = conversation_messages(record["conversations"], len(images), int(bool(frames)))
        text, spans = answer_spans(self.processor, messages)
        visual, counts = self.processor.visual_inputs(images)
        text, spans = expand_placeholders(text, self.image_token, counts, spans)
        video_counts = []
        if frames:
            video, video_tokens = self.processor.video_inputs(frames, float(record.get("fps", DEFAULT_VIDEO_FPS)))
            visual.update(video)
            video_counts = [video_tokens]
        text, spans = expand_placeholders(text, self.processor.video_token, video_counts, spans, what="videos")
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        labels = [IGNORE_INDEX] * len(input_ids)
        added = set(self.tokenizer.get_added_vocab().values()) | set(self.tokenizer.all_special_ids)
        for start, end in spans:
            inside = [i for i, (begin, finish) in enumerate(offsets) if begin < end and finish > start]
            after = next((i for i, (begin, _) in enumerate(offsets) if begin >= end), None)
            if after is None or input_ids[after] not in added or offsets[after][0] != end:
                raise ValueError("the chat template writes no end-of-turn token right after an answer "
                                 f"({text[end:end + 20]!r} follows it)")
            for i in [*inside, after]:
                labels[i] = input_ids[i]
        video_id = self.processor.video_token_id
        if self.processor.layout is None:  # Qwen's M-RoPE positions read the token types
            token_types = [1 if token == self.image_token_id else 2 if token == video_id else 0
                           for token in input_ids]
            visual["mm_token_type_ids"] = torch.tensor(token_types, dtype=torch.int)
        return input_ids, labels, visual

    def __getitem__(self, index: int) -> dict | None:
        sample = super().__getitem__(index)
        if sample is not None and "mm_token_type_ids" in sample:  # truncation cuts the token types with the ids
            sample["mm_token_type_ids"] = sample["mm_token_type_ids"][: sample["input_ids"].numel()]
        return sample
