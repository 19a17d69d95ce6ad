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

Images and videos go through the checkpoint's own processor (`AutoProcessor` from the checkpoint directory: its
image and video processors, its placeholder expansion, its tokenizer) wherever torchvision is importable; the
answers' spans are carried through the processor's placeholder expansion (its text replacement offsets) to the
tokens. Without torchvision transformers cannot build the video processors (nor the torchvision image backends), and
a fallback lays the inputs out itself, saying so once per process: the checkpoint's PIL image processor, each image
placeholder expanded to grid_t * grid_h * grid_w / merge_size^2 copies (LLaVA-OneVision: anyres crops, counted in
onevision.py), videos resized by the video processor's own rule (epic_ext.data.video) and, for Qwen3-VL, the
per-frame timestamps written as its processor writes them. The torchvision test stack proves the two paths equal
(python_tests/data/test_data_official.py; the pixel tolerance of the two backends is in docs/models.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .llava import LlavaDataset
from .records import IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, image_names, placeholder_problem
from .records import video_frames as video_frame_names
from .video import frame_timestamps, qwen_frame_size, resize_frames, video_settings

logger = logging.getLogger(__name__)
_FALLBACK_NOTED: set[str] = set()


def note_fallback(what: str, how: str = "the checkpoint's PIL image processor and a re-implementation of its video "
                  "processor") -> None:
    """Says once per process and kind of checkpoint that epic_ext's own input path is used instead of the
    checkpoint's processor."""
    if what in _FALLBACK_NOTED:
        return
    _FALLBACK_NOTED.add(what)
    logger.warning("epic_ext: %s inputs are built by epic_ext's fallback (%s), not by the checkpoint's own "
                   "processor (torchvision is not importable, or the fallback was asked for); docs/models.md lists "
                   "the measured differences", what, how)


QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_VIDEO_TOKEN = "<|video_pad|>"
ONEVISION_IMAGE_TOKEN = "<image>"
ONEVISION_VIDEO_TOKEN = "<video>"
DEFAULT_VIDEO_FPS = 2.0  # frames per second of a record's frame list without an "fps" field (Qwen's sampling rate)


@dataclass
class ChatProcessor:
    """What a chat-template family needs to build samples: the tokenizer (with the chat template), the image
    processor, the checkpoint's own processor where torchvision is importable, and the checkpoint directory the
    processor files are exported from.

    Attributes:
        tokenizer: a fast tokenizer (offsets are used to find the answers).
        image_processor: the checkpoint's image processor (pixel_values + image_grid_thw); the official
            processor's own on the official path.
        chat_template: the Jinja template (the tokenizer's, else the checkpoint's chat_template.jinja / .json).
        source: the checkpoint directory; `save_pretrained` copies its processor files.
        image_token: the placeholder each image's template marker holds (Qwen: ``<|image_pad|>``).
        video_token: the same for a video (Qwen: ``<|video_pad|>``).
        videos: whether the family takes video records.
        layout: LLaVA-OneVision's token-count rule (onevision.OnevisionLayout, from the model config); None
            for the Qwen families.
        official: the checkpoint's AutoProcessor (image and video processors, placeholder expansion); None: the
            fallback path (no torchvision).
        video_type: the checkpoint's video processor class (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor,
            LlavaOnevisionVideoProcessor): the fallback's resize rule and prompt.
        video_config: the fallback's video processor settings (epic_ext.data.video.video_settings).
    """

    tokenizer: Any
    image_processor: Any
    chat_template: str
    source: str
    image_token: str = QWEN_IMAGE_TOKEN
    video_token: str = QWEN_VIDEO_TOKEN
    videos: bool = True
    layout: Any = None
    official: Any = None
    video_type: str | None = None
    video_config: dict | None = None

    def __post_init__(self):
        if self.video_type is None:
            self.video_type = "LlavaOnevisionVideoProcessor" if self.layout is not None else "Qwen2VLVideoProcessor"

    @classmethod
    def from_pretrained(cls, path: str, *, image_processor=None, official=None, videos: bool = True,
                        onevision_config=None, video_type: str | None = None) -> ChatProcessor:
        """Loads the tokenizer and chat template of a checkpoint directory. The family (epic_ext.models.families)
        supplies what depends on it: the checkpoint's AutoProcessor (`official`, where torchvision is importable)
        or the (PIL) image processor it loaded for the fallback, whether it takes video records, its video
        processor class and, for LLaVA-OneVision, the model config its token-count layout comes from. The fallback
        reads the video processor's settings from the checkpoint as transformers does (epic_ext.data.video).

        Raises:
            ValueError: neither processor given, no chat template in the checkpoint, a slow tokenizer (no offsets),
                or a tokenizer without the image token.
        """
        from transformers import AutoTokenizer  # noqa: PLC0415

        if official is None and image_processor is None:
            raise ValueError("ChatProcessor.from_pretrained: give the checkpoint's processor (official) or its image "
                             "processor (image_processor, the fallback path)")
        tokenizer = official.tokenizer if official is not None else AutoTokenizer.from_pretrained(path)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is needed to find the answers' tokens")
        template = getattr(official, "chat_template", None) or getattr(tokenizer, "chat_template", None)
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
        layout, image_token, video_token = None, QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN
        if onevision_config is not None:
            from .onevision import OnevisionLayout  # noqa: PLC0415

            layout, image_token, video_token = (OnevisionLayout.from_config(onevision_config),
                                                ONEVISION_IMAGE_TOKEN, ONEVISION_VIDEO_TOKEN)
        image_token = getattr(tokenizer, "image_token", None) or image_token
        if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"{path}: the tokenizer has no {image_token} token")
        video_type = video_type or ("LlavaOnevisionVideoProcessor" if layout is not None else "Qwen2VLVideoProcessor")
        video_config = video_settings(path, video_type) if official is None and videos else None
        if official is None:
            note_fallback(os.path.basename(os.path.normpath(path)) or path)
        return cls(tokenizer=tokenizer, image_processor=official.image_processor if official is not None
                   else image_processor, chat_template=template, source=path, image_token=image_token,
                   video_token=getattr(tokenizer, "video_token", None) or video_token, videos=videos, layout=layout,
                   official=official, video_type=video_type, video_config=video_config)

    def save_pretrained(self, target: str | os.PathLike) -> None:
        """Copies the checkpoint's processor files (everything but the weights and the model / generation config)
        into `target`, so AutoProcessor / AutoTokenizer load there exactly what training used. A source that is
        not a local directory (a Hub id): the tokenizer and image processor are saved, with the chat template."""
        import shutil  # noqa: PLC0415

        os.makedirs(target, exist_ok=True)
        if not os.path.isdir(self.source) and self.official is not None:
            self.official.save_pretrained(os.fspath(target))
            return
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
        """Fallback: one video from its frames (PIL images, time order, all resized to the first's size), laid out
        as the checkpoint's video processor lays it out: every frame resized to the size the video processor's
        rule gives (epic_ext.data.video.qwen_frame_size, the video settings' pixel limits), rescaled and
        normalised with the video settings by the image processor, the frame count padded to a multiple of
        temporal_patch_size by repeating the last frame, and each patch holding temporal_patch_size consecutive
        frames (rows in (t, h / m, w / m, m, m) order, values (C, t, p, p)).

        Returns:
            ({"pixel_values_videos": [t * h * w, C * tp * p * p] float32, "video_grid_thw": [1, 3] int64,
            "second_per_grid_ts": [1] float32 (tp / fps; Qwen2.5-VL only)}, the video's visual tokens
            t * h * w / merge_size^2). LLaVA-OneVision: see onevision.onevision_video_inputs (fps unused).
        """
        if not frames:
            raise ValueError("video_inputs: a video needs at least one frame")
        frames = same_size(frames)
        settings = self.video_config or video_settings(self.source, self.video_type)
        if self.layout is not None:
            from .onevision import onevision_video_inputs  # noqa: PLC0415

            return onevision_video_inputs(self.image_processor, self.layout, frames, settings)
        if not fps > 0:
            raise ValueError(f"video_inputs: fps must be > 0, got {fps}")
        temporal, patch, merge = (int(settings[key]) for key in ("temporal_patch_size", "patch_size", "merge_size"))
        width, height = frames[0].size
        height, width = qwen_frame_size(len(frames), height, width, settings,
                                        settings.get("video_processor_type", self.video_type))
        frames = resize_frames(frames, height, width, settings["resample"])
        frames = frames + [frames[-1]] * (-len(frames) % temporal)
        per_frame = self.image_processor(  # each frame as an image: its patches repeat it temporal times
            images=frames, do_resize=False, image_mean=settings["image_mean"], image_std=settings["image_std"],
            rescale_factor=settings["rescale_factor"], patch_size=patch, merge_size=merge,
            temporal_patch_size=temporal, return_tensors="pt")
        grid = per_frame["image_grid_thw"][0]
        rows = int(grid[1] * grid[2])
        channels_time_patch = per_frame["pixel_values"].shape[1]  # C * t * p * p, stored as (C, t, p, p)
        channels = channels_time_patch // (temporal * patch * patch)
        patches = per_frame["pixel_values"].view(len(frames), rows, channels, temporal, patch * patch)
        first_slot = patches[:, :, :, 0]  # [T, rows, C, p * p]: the frame itself
        groups = first_slot.view(len(frames) // temporal, temporal, rows, channels, -1)
        video = groups.permute(0, 2, 3, 1, 4).reshape(len(frames) // temporal * rows, channels_time_patch)
        video_grid = torch.tensor([[len(frames) // temporal, int(grid[1]), int(grid[2])]], dtype=torch.long)
        visual = {"pixel_values_videos": video.to(torch.float32).contiguous(), "video_grid_thw": video_grid}
        if not self.timestamps:
            visual["second_per_grid_ts"] = torch.tensor([temporal / fps], dtype=torch.float32)
        return visual, int(video_grid.prod()) // merge ** 2

    @property
    def timestamps(self) -> bool:
        """Whether the prompt writes each temporal patch's time (Qwen3-VL)."""
        return self.video_type == "Qwen3VLVideoProcessor"

    def video_text(self, grid_thw, frames: int, fps: float) -> str:
        """Fallback, Qwen3-VL: the text its processor writes for a video: per temporal patch
        ``<t seconds><|vision_start|>`` + the patch's tokens + ``<|vision_end|>`` (times from
        epic_ext.data.video.frame_timestamps, one decimal)."""
        grid = [int(v) for v in grid_thw]
        settings = self.video_config or video_settings(self.source, self.video_type)
        start, end = self.vision_markers
        per_frame = self.video_token * (grid[1] * grid[2] // int(settings["merge_size"]) ** 2)
        times = frame_timestamps(frames, fps, int(settings["temporal_patch_size"]))
        return "".join(f"<{time:.1f} seconds>{start}{per_frame}{end}" for time in times[: grid[0]])

    @property
    def vision_markers(self) -> tuple[str, str]:
        return (getattr(self.tokenizer, "vision_start_token", None) or "<|vision_start|>",
                getattr(self.tokenizer, "vision_end_token", None) or "<|vision_end|>")

    def encode(self, text: str, spans: list[tuple[int, int]], images: list,
               video: tuple[list, float] | None = None) -> tuple[list[int], list, list[tuple[int, int]], str, dict]:
        """One rendered conversation with its visual inputs: (input_ids, their character offsets in the expanded
        text, the answer `spans` moved into it, the expanded text, the visual tensors).

        The official processor expands the placeholders and processes the images and the video itself; the
        fallback does it as described in the module docstring.

        Args:
            text: the template's rendering (one placeholder per image and video).
            spans: character spans in `text` (the answers), carried into the expanded text.
            images: PIL images in placeholder order.
            video: None or (frames as PIL images, frames per second).
        """
        if self.official is not None:
            return self._official_encode(text, spans, images, video)
        visual, counts = self.visual_inputs(images)
        text, spans = expand_placeholders(text, self.image_token, [self.image_token * n for n in counts], spans)
        video_texts = []
        if video is not None:
            frames, fps = video
            video_visual, video_count = self.video_inputs(frames, fps)
            visual.update(video_visual)
            video_texts = [self.video_text(video_visual["video_grid_thw"][0], len(frames), fps) if self.timestamps
                           else self.video_token * video_count]
        wrapper = "".join((self.vision_markers[0], self.video_token, self.vision_markers[1]))
        text, spans = expand_placeholders(text, self.video_token, video_texts, spans, what="videos",
                                          wrapper=wrapper if self.timestamps else None)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoded["input_ids"])
        if self.layout is None:  # Qwen's M-RoPE positions read the token types
            visual["mm_token_type_ids"] = torch.tensor(
                [1 if t == self.image_token_id else 2 if t == self.video_token_id else 0 for t in input_ids],
                dtype=torch.int)
        return input_ids, list(encoded["offset_mapping"]), spans, text, visual

    def _official_encode(self, text, spans, images, video):
        kwargs = {"text": [text], "return_tensors": "pt", "return_offsets_mapping": True,
                  "return_text_replacement_offsets": True}
        if images:  # LLaVA-OneVision: one sample's images nested, so several are one multi-image prompt (base crops)
            rgb = [image.convert("RGB") for image in images]
            kwargs["images"] = [rgb] if self.layout is not None else rgb
        if video is not None:
            frames, fps = video
            if not frames:
                raise ValueError("a video needs at least one frame")
            if not fps > 0:
                raise ValueError(f"a video's fps must be > 0, got {fps}")
            frames = [frame.convert("RGB") for frame in same_size(frames)]
            kwargs.update(videos=[frames], do_sample_frames=False, video_metadata=[
                {"total_num_frames": len(frames), "fps": float(fps), "frames_indices": list(range(len(frames)))}])
        out = self.official(**kwargs)
        replacements = out.pop("text_replacement_offsets")[0]
        pieces, position = [], 0
        for replacement in replacements:
            pieces += [text[position:replacement["span"][0]], replacement["replacement"]]
            position = replacement["span"][1]
        expanded = "".join(pieces) + text[position:]

        def moved(offset: int) -> int:
            for replacement in replacements:
                if replacement["span"][0] < offset < replacement["span"][1]:
                    raise ValueError("an answer overlaps a visual placeholder")
            before = [r for r in replacements if r["span"][1] <= offset]
            return offset if not before else offset - before[-1]["span"][1] + before[-1]["new_span"][1]

        input_ids = out.pop("input_ids")[0].tolist()
        offsets = [tuple(pair) for pair in out.pop("offset_mapping")[0].tolist()]
        out.pop("attention_mask", None)
        visual = {}
        for key, value in out.items():
            if key == "mm_token_type_ids":
                value = torch.as_tensor(value)[0].to(torch.int)
            elif key == "second_per_grid_ts":
                value = torch.as_tensor(value, dtype=torch.float32)
            elif torch.is_tensor(value) and value.is_floating_point():
                value = value.to(torch.float32)
            visual[key] = value
        if self.layout is not None and "pixel_values" not in visual:
            visual.update(pixel_values=None, image_sizes=None, batch_num_images=torch.zeros(1, dtype=torch.long))
        elif self.layout is not None:
            visual.setdefault("batch_num_images", torch.tensor([len(images)], dtype=torch.long))
        if self.layout is None and "pixel_values" not in visual:
            visual.update(pixel_values=None, image_grid_thw=None)
        return input_ids, offsets, [(moved(a), moved(b)) for a, b in spans], expanded, visual

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
            ids, _, _, _, visual = self.encode(text, [], item_images, video)
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


def expand_placeholders(text: str, token: str, replacements: list[str], spans: list[tuple[int, int]],
                        what: str = "images", wrapper: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Replaces the i-th `token` in text (the i-th `wrapper` around it, where given and present: Qwen3-VL's video
    markers, which its per-frame text replaces) by replacements[i]; returns the new text and the spans moved with
    it.

    Raises:
        ValueError: the text holds another number of `token` than len(replacements).
    """
    found = text.count(token)
    if found != len(replacements):
        raise ValueError(f"the chat template wrote {found} {token} placeholders for {len(replacements)} {what}")
    pieces, shifts, position = [], [], 0
    for replacement in replacements:
        at, length = text.index(token, position), len(token)
        if wrapper is not None:
            outer = at - wrapper.index(token)
            if outer >= position and text.startswith(wrapper, outer):
                at, length = outer, len(wrapper)
        pieces += [text[position:at], replacement]
        shifts.append((at, len(replacement) - length))
        position = at + length
    pieces.append(text[position:])

    def moved(offset: int) -> int:
        return offset + sum(shift for at, shift in shifts if at < offset)

    return "".join(pieces), [(moved(start), moved(end)) for start, end in spans]


def same_size(frames: list) -> list:
    """A video's frames, every one at the first frame's size (a video is one array)."""
    size = frames[0].size
    return [frame if frame.size == size else frame.resize(size) for frame in frames]


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
        video = (frames, float(record.get("fps", DEFAULT_VIDEO_FPS))) if frames else None
        input_ids, offsets, spans, text, visual = self.processor.encode(text, spans, images, video)
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
        return input_ids, labels, visual

    def __getitem__(self, index: int) -> dict | None:
        sample = super().__getitem__(index)
        if sample is not None and "mm_token_type_ids" in sample:  # truncation cuts the token types with the ids
            sample["mm_token_type_ids"] = sample["mm_token_type_ids"][: sample["input_ids"].numel()]
        return sample
