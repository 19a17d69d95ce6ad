"""`lmms-eval --model epic_ext`: any supported checkpoint, compressed with epic_ext, on lmms-eval's benchmarks.

Registered through the entry-point group `lmms_eval.models` (pyproject.toml: ``epic_ext =
"epic_ext.lmms_eval_plugin:MANIFEST"``) once epic_ext is installed with its ``eval`` extra; only this module imports
lmms_eval, and ``import epic_ext`` never imports this module.

    lmms-eval --model epic_ext --model_args pretrained=DIR,method=fastv,layer=2,keep=64 --tasks gqa --batch_size 8

Model arguments (``--model_args k=v,...``): ``pretrained`` (checkpoint directory or Hub id; its config.json's
model_type picks the family: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision), ``method`` (fastv, dart,
random), ``layer`` (K, default 2), ``keep`` (visual tokens kept per sample) or ``ratio`` (fraction removed),
``batch_size``, ``dtype`` (auto, fp32, bf16, fp16), ``device``, ``attn_implementation`` (the language model's:
eager, sdpa, flash_attention_2; default sdpa), ``max_frames_num`` (frames sampled from a
video, default 32; all of a shorter one's), ``max_new_tokens`` (when the task's generation_kwargs give none, default
128), ``seed`` (Random compression), ``min_pixels`` / ``max_pixels`` (Qwen2.5-VL / Qwen3-VL: the image processor's
pixel budget per image or video frame, in place of the checkpoint's; lmms-eval's own qwen2_5_vl wrapper runs at
200704 / 1605632 unless told). No ``method`` / ``keep`` / ``ratio`` (or ``ratio=0``, or, for LLaVA-1.5, ``keep``
equal to the model's visual tokens per image) is the unmodified model.

Prompts and batching are `python -m epic_ext.eval`'s (epic_ext.eval.generate_chunk): LLaVA-1.5's and LLaVA-NeXT's
``USER: <image>\\n... ASSISTANT:``, the checkpoint's chat template for the other families, left padding, greedy unless
the task samples.

A bad model argument ends the run with one line before the model loads, and a generation error ends it naming the
sample; both are SystemExit subclasses because lmms-eval's command line catches every Exception, prints it and
exits with status 0 (its own LLaVA wrapper even scores a failed generation as an empty answer).

The compression setting is lmms-eval's ``config.model_args``; its measured cost (per-sample means of the visual
tokens, the visual tokens kept, prefill TFLOPs by FastV's formula and exactly, KV-cache MB, from epic_ext.cost) goes
into the results' ``throughput`` section as ``avg_epic_*``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from . import cost
from .compress import available as available_methods
from .compress import get_compressor
from .data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .eval import generate_chunk
from .models import apply_compression
from .models.families import TRAINABLE, check_attn_implementation, describe, family_of

_logger = logging.getLogger(__name__)

MANIFEST = ModelManifest(model_id="epic_ext", simple_class_path="epic_ext.lmms_eval_plugin.EpicExtSimple",
                         chat_class_path="epic_ext.lmms_eval_plugin.EpicExt")

DTYPES = {"auto": "auto", "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_FRAMES = 32


class ModelArgumentError(SystemExit):
    """A bad ``--model_args`` value: ends the run with this one line and exit status 1, before the model loads."""


class GenerationError(SystemExit):
    """Generation failed for a sample: ends the run naming it (the cause is logged with its traceback)."""


class UnsupportedRequest(SystemExit):
    """A request type the plugin does not serve (likelihood, multi-round): ends the run naming the task."""


def _tasks_of(requests) -> str:
    return ", ".join(sorted({str(getattr(request, "task_name", "?")) for request in requests}))


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """The validated model arguments."""

    pretrained: str
    method: str | None = None  # None: the unmodified model
    layer: int = 2
    keep: int | None = None
    ratio: float | None = None
    batch_size: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    attn_implementation: str | None = None
    max_frames_num: int = DEFAULT_FRAMES
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0
    min_pixels: int | None = None  # None: the checkpoint's image processor's
    max_pixels: int | None = None

    @property
    def compressed(self) -> bool:
        return self.method is not None


def _fail(message: str):
    raise ModelArgumentError(f"epic_ext model_args: {message}")


def _int(name: str, value, low: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # lmms-eval passes --batch_size as a string
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def parse_model_args(pretrained=None, method=None, layer=None, keep=None, ratio=None, batch_size=1, dtype="auto",
                     device=None, attn_implementation=None, max_frames_num=DEFAULT_FRAMES,
                     max_new_tokens=DEFAULT_MAX_NEW_TOKENS, seed=0, min_pixels=None, max_pixels=None,
                     max_batch_size=None, **unknown):
    """Checks the model arguments against the checkpoint's config.json (no weights are read).

    Returns:
        (PluginSettings, the checkpoint's Family, its transformers config).

    Raises:
        ModelArgumentError: an unknown argument, a missing or unsupported checkpoint, an unknown method, a layer
            outside the model's decoder layers, ratio and keep both given, a keep above the visual tokens per image
            (LLaVA-1.5), a bad batch size, dtype or device, min_pixels / max_pixels for a family without a
            pixel budget (not Qwen2.5-VL / Qwen3-VL) or with min_pixels above max_pixels.
    """
    del max_batch_size  # lmms-eval passes its --max_batch_size; batches here are batch_size
    if unknown:
        _fail(f"unknown argument(s) {', '.join(sorted(unknown))}; known: pretrained, method, layer, keep, ratio, "
              "batch_size, dtype, device, attn_implementation, max_frames_num, max_new_tokens, seed, min_pixels, "
              "max_pixels")
    if not pretrained:
        _fail("pretrained is required (a checkpoint directory or Hub id)")
    pretrained = str(pretrained)
    if os.path.isdir(pretrained) and not os.path.isfile(os.path.join(pretrained, "config.json")):
        _fail(f"pretrained={pretrained} has no config.json")
    try:
        from transformers import AutoConfig  # noqa: PLC0415

        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        _fail(f"pretrained={pretrained}: {' '.join(str(error).split())}")
    try:
        family = family_of(config, TRAINABLE)
    except ValueError:
        _fail(f"pretrained={pretrained} is a {getattr(config, 'model_type', None)!r} model; supported (model_type): "
              f"{describe(TRAINABLE)}")
    if keep is not None and ratio is not None:
        _fail(f"give ratio or keep, not both (got ratio={ratio}, keep={keep})")
    if (method is not None or layer is not None) and keep is None and ratio is None:
        given = f"method={method}" if method is not None else f"layer={layer}"
        _fail(f"{given} needs keep= (visual tokens kept per sample) or ratio= (the fraction removed)")
    if method is None and (keep is not None or ratio is not None):
        method = "fastv"  # the default compressor, as in epic_ext.models.apply_compression
    if method is not None and method not in available_methods():
        _fail(f"method must be one of {', '.join(available_methods())}, got {method!r}")
    layer = 2 if layer is None else layer
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0.0 <= float(ratio) < 1.0):
        _fail(f"ratio must be a number in [0, 1) (the fraction of visual tokens removed), got {ratio!r}")
    visual = family.visual_tokens_per_image(config)
    if keep is not None:
        _int("keep", keep, 1)
        if visual is not None and keep > visual:
            _fail(f"keep must be in [1, {visual}] (the model's visual tokens per image), got {keep}")
    full = (ratio is not None and float(ratio) == 0.0) or (keep is not None and keep == visual)
    if method is not None and not full:
        layers = config.text_config.num_hidden_layers
        low = get_compressor(method).min_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer < layers:
            _fail(f"layer must be in [{low}, {layers - 1}] for method={method} on this model ({layers} decoder "
                  f"layers), got {layer!r}")
    if str(dtype) not in DTYPES:
        _fail(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(str(device))
    except RuntimeError as error:
        _fail(f"device={device}: {error}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        _fail(f"device={device}: CUDA is not available")
    if min_pixels is not None or max_pixels is not None:
        if family.adapter != "qwen_vl":
            _fail(f"min_pixels / max_pixels are the Qwen2.5-VL / Qwen3-VL image processor's pixel budget; "
                  f"pretrained={pretrained} is {family.title}")
        min_pixels = None if min_pixels is None else _int("min_pixels", min_pixels, 1)
        max_pixels = None if max_pixels is None else _int("max_pixels", max_pixels, 1)
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            _fail(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    if attn_implementation is not None:
        try:
            weights = DTYPES[str(dtype)]  # "auto": the checkpoint's, not known before it loads
            check_attn_implementation(str(attn_implementation), parsed,
                                      weights if isinstance(weights, torch.dtype) else None)
        except ValueError as error:  # "attn_implementation flash_attention_2 needs ..." -> "...=flash_attention_2 ..."
            named = f"attn_implementation {attn_implementation} "
            message = str(error)
            _fail(f"attn_implementation={attn_implementation} {message[len(named):]}" if message.startswith(named)
                  else message)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail("the epic_ext model runs in one process; launch lmms-eval without several processes")
    settings = PluginSettings(
        pretrained=pretrained, method=None if full else method, layer=layer, keep=None if full else keep,
        ratio=None if full or ratio is None else float(ratio), batch_size=_int("batch_size", batch_size, 1),
        dtype=str(dtype), device=str(device), attn_implementation=attn_implementation,
        max_frames_num=_int("max_frames_num", max_frames_num, 1),
        max_new_tokens=_int("max_new_tokens", max_new_tokens, 1), seed=_int("seed", seed, 0), min_pixels=min_pixels,
        max_pixels=max_pixels)
    return settings, family, config


def load_processor(family, pretrained: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The family's processor of the checkpoint; with min_pixels / max_pixels (Qwen families), the pixel budget of
    its image and video processors replaced, as lmms-eval's Qwen wrappers load theirs (`AutoProcessor.from_pretrained
    (path, min_pixels=..., max_pixels=...)`, which sets both): the official processor reloaded so, or, on the
    fallback path, the image processor reloaded and the video settings' size replaced."""
    from .models import _hf  # noqa: PLC0415

    processor = family.load_processor(pretrained)
    budget = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
              if value is not None}
    if not budget:
        return processor
    if getattr(processor, "official", None) is not None:
        processor.official = _hf.auto_processor(pretrained, **budget)
        processor.image_processor = processor.official.image_processor
        return processor
    processor.image_processor = type(processor.image_processor).from_pretrained(pretrained, **budget)
    if getattr(processor, "video_config", None) is not None:
        size = dict(processor.video_config["size"])
        size.update({"shortest_edge": min_pixels} if min_pixels is not None else {})
        size.update({"longest_edge": max_pixels} if max_pixels is not None else {})
        processor.video_config = {**processor.video_config, "size": size}
    return processor


def load_video(path: str, frames: int) -> tuple[list, float]:
    """`frames` frames sampled uniformly from a video file (indices linspace(0, n - 1, frames), as lmms-eval's
    LLaVA wrapper samples; all n frames, none repeated, when the video has at most `frames`, as lmms-eval's own video
    loader and Qwen wrappers take), decoded with PyAV; and their rate in frames per second of the video's
    duration."""
    import av  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    with av.open(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for _ in container.decode(stream))
        rate = float(stream.average_rate or 0)
    if total < 1:
        raise ValueError(f"{path}: no video frames")
    frames = min(frames, total)
    wanted = np.linspace(0, total - 1, frames, dtype=int).tolist()
    picked: dict[int, object] = {}
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                picked[index] = frame.to_image().convert("RGB")
            if index >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in picked]
    if missing:
        raise ValueError(f"{path}: could not decode frames {missing[:5]}")
    duration = total / rate if rate > 0 else None
    return [picked[i] for i in wanted], (frames / duration if duration else 0.0)


def _visual_path(url) -> str:
    if isinstance(url, dict):
        url = url.get("path") or url.get("url") or url.get("video")
    if not isinstance(url, str):
        raise ValueError(f"a video must be a file path, got {type(url).__name__}")
    return url


def _item_from_messages(messages, max_frames: int) -> dict:
    """An epic_ext.eval item from lmms-eval chat messages (one user turn: images, at most one video, text)."""
    images, video, question = [], None, ""
    for message in messages:
        message = message.model_dump() if hasattr(message, "model_dump") else message
        role, content = message["role"], message["content"]
        if role != "user":
            raise ValueError(f"a {role} message: the epic_ext model takes one user turn (no system prompt, no "
                             "multi-turn history)")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            kind = part["type"]
            if kind == "text":
                question += part["text"]
            elif kind == "image":
                images.append(part["url"])
                question += IMAGE_PLACEHOLDER + "\n"
            elif kind == "video":
                if video is not None:
                    raise ValueError("more than one video in a sample")
                video = load_video(_visual_path(part["url"]), max_frames)
                question += VIDEO_PLACEHOLDER + "\n"
            else:
                raise ValueError(f"{kind} inputs are not supported")
    return _item(question, images, video)


def _item_from_visuals(context: str, visuals, max_frames: int) -> dict:
    """An item from a simple request: the context, with placeholders put first when it has none (as lmms-eval's
    LLaVA wrapper does), and the doc's visuals (PIL images, or a video path)."""
    from PIL import Image  # noqa: PLC0415

    images, video = [], None
    for visual in visuals or []:
        if isinstance(visual, Image.Image):
            images.append(visual)
        elif video is None:
            video = load_video(_visual_path(visual), max_frames)
        else:
            raise ValueError("more than one video in a sample")
    if images and IMAGE_PLACEHOLDER not in context:
        context = (IMAGE_PLACEHOLDER + "\n") * len(images) + context
    if video is not None and VIDEO_PLACEHOLDER not in context:
        context = VIDEO_PLACEHOLDER + "\n" + context
    return _item(context, images, video)


def _item(question: str, images: list, video) -> dict:
    item = {"question": question, "images": images}
    if video is not None:
        item["video"], item["fps"] = video
    return item


def _generation_kwargs(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """(model.generate keyword arguments, stop strings) from a task's generation_kwargs."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kwargs.pop("temperature", 0) or 0)
    max_new_tokens, num_beams = kwargs.pop("max_new_tokens", None), kwargs.pop("num_beams", None)
    out = {"max_new_tokens": default_max_new_tokens if max_new_tokens is None else int(max_new_tokens),
           "num_beams": 1 if num_beams is None else int(num_beams)}
    sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
    top_p = kwargs.pop("top_p", None)
    out["do_sample"] = sample
    if sample:
        out["temperature"] = temperature or 1.0
        if top_p is not None:
            out["top_p"] = float(top_p)
    kwargs.pop("image_sizes", None)
    if kwargs:
        _logger.warning("epic_ext: generation_kwargs not used: %s", ", ".join(sorted(kwargs)))
    return out, [stop for stop in until if stop]


def _cut(answer: str, until: Sequence[str]) -> str:
    for stop in until:
        answer = answer.split(stop, 1)[0]
    return answer


class EpicExt(lmms):
    """The chat model (lmms-eval's default): requests carry the doc's chat messages."""

    is_simple = False
    chat_template = None  # prompts are built by epic_ext (lmms-eval logs this with --apply_chat_template)

    def __init__(self, **model_args) -> None:
        super().__init__()
        self.settings, self.family, config = parse_model_args(**model_args)
        s = self.settings
        self.model = self.family.load_model(s.pretrained, DTYPES[s.dtype],
                                            attn_implementation=s.attn_implementation).to(s.device).eval()
        self.processor = load_processor(self.family, s.pretrained, s.min_pixels, s.max_pixels)
        self.handle = None
        if s.compressed:
            extra = {"generator": torch.Generator().manual_seed(s.seed)} if s.method == "random" else {}
            self.handle = apply_compression(self.model, s.method, layer=s.layer, keep=s.keep, ratio=s.ratio,
                                            **extra)
        self.shape = cost.model_shape(config)
        self.kv_bytes = torch.empty((), dtype=self.model.dtype).element_size()
        amount = f"keep {s.keep}" if s.keep is not None else f"ratio {s.ratio}"
        _logger.info("epic_ext: %s (%s) %s", s.pretrained, self.family.name,
                     f"{s.method} at layer {s.layer}, {amount}" if s.compressed else "uncompressed")

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def device(self):
        return torch.device(self.settings.device)

    def _build_item(self, args) -> dict:
        _context, doc_to_messages, _gen_kwargs, doc_id, task, split = args
        return _item_from_messages(doc_to_messages(self.task_dict[task][split][doc_id]), self.settings.max_frames_num)

    @staticmethod
    def _request_parts(args) -> tuple[str, dict, object, str, str]:
        context, _doc_to_messages, gen_kwargs, doc_id, task, split = args
        return context, gen_kwargs, doc_id, task, split

    def sample_cost(self, prompt_tokens: int, visual_tokens: int) -> dict:
        """The analytic cost (epic_ext.cost) of one sample's prefill with this model's compression setting."""
        s = self.settings
        kept = visual_tokens
        if s.compressed and visual_tokens:
            kept = (min(s.keep, visual_tokens) if s.keep is not None
                    else cost.kept_from_ratio(visual_tokens, s.ratio))
        layer = s.layer if s.compressed else 0
        lengths = cost.tokens_per_layer(self.shape, prompt_tokens, visual_tokens, layer, kept)
        return {"epic_visual_tokens": visual_tokens, "epic_visual_tokens_kept": kept,
                "epic_prefill_tflops_fastv": cost.prefill_flops(self.shape, lengths, "fastv") / 1e12,
                "epic_prefill_tflops_exact": cost.prefill_flops(self.shape, lengths, "exact", 1) / 1e12,
                "epic_kv_mb": cost.kv_cache_bytes(self.shape, prompt_tokens, visual_tokens, layer, kept,
                                                  self.kv_bytes) / 1e6}

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics  # noqa: PLC0415

        args = [request.args for request in requests]
        groups: dict[str, list[int]] = {}  # one batch never mixes generation settings
        for index, arg in enumerate(args):
            groups.setdefault(json.dumps(self._request_parts(arg)[1], sort_keys=True, default=str), []).append(index)
        results: list[GenerationResult | None] = [None] * len(args)
        costs, started, generated_tokens = [], time.perf_counter(), 0
        for indices in groups.values():
            gen_kwargs, until = _generation_kwargs(self._request_parts(args[indices[0]])[1],
                                                   self.settings.max_new_tokens)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                try:
                    items = [self._build_item(args[i]) for i in chunk]
                    generated = generate_chunk(self.model, self.processor, items, device=self.settings.device,
                                               **gen_kwargs)
                except Exception as error:
                    names = ", ".join("{3}/{4} doc {2}".format(*self._request_parts(args[i])) for i in chunk)
                    _logger.error("epic_ext: generation failed on %s", names, exc_info=True)
                    raise GenerationError(f"epic_ext: generation failed on {names}: {type(error).__name__}: "
                                          f"{' '.join(str(error).split())}") from error
                for i, answer, visual, prompt in zip(chunk, generated.answers, generated.visual_tokens,
                                                     generated.prompt_tokens):
                    answer = _cut(answer, until)
                    context, kwargs, *_ = self._request_parts(args[i])
                    output_tokens = len(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
                    generated_tokens += output_tokens
                    results[i] = GenerationResult(text=answer, token_counts=TokenCounts(
                        input_tokens=int(prompt), output_tokens=output_tokens))
                    costs.append(self.sample_cost(int(prompt), int(visual)))
                    self.cache_hook.add_partial("generate_until", (context, kwargs), answer)
        elapsed = time.perf_counter() - started
        if costs:
            means = {key: sum(c[key] for c in costs) / len(costs) for key in costs[0]}
            log_metrics(total_gen_tokens=generated_tokens, total_elapsed_time=elapsed,
                        avg_speed=generated_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=means)
        return results

    def loglikelihood(self, requests):
        raise UnsupportedRequest(f"epic_ext: loglikelihood requests (multiple-choice scoring by likelihood; task "
                                 f"{_tasks_of(requests)}) are not supported; use a generate_until variant of the task")

    def generate_until_multi_round(self, requests):
        raise UnsupportedRequest(f"epic_ext: multi-round generation (task {_tasks_of(requests)}) is not supported")


class EpicExtSimple(EpicExt):
    """The simple model (``--force_simple``): requests carry the context string and the doc's visuals."""

    is_simple = True

    def _build_item(self, args) -> dict:
        context, _gen_kwargs, doc_to_visual, doc_id, task, split = args
        return _item_from_visuals(context, doc_to_visual(self.task_dict[task][split][doc_id]),
                                  self.settings.max_frames_num)

    @staticmethod
    def _request_parts(args) -> tuple[str, dict, object, str, str]:
        context, gen_kwargs, _doc_to_visual, doc_id, task, split = args
        return context, gen_kwargs, doc_id, task, split
