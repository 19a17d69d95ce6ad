"""Model families: everything epic_ext knows about one kind of checkpoint, in one object. The trainer, the evaluator,
the cost model, the demo and the tests ask a `Family`; nothing else branches on a `model_type`.

A family knows its transformers classes and config `model_type`, the adapter module that plugs it into the pruning
engine, how its processor and training samples are built, its token-budget rule (a fixed count per image, or a
per-sample count for anyres / dynamic-resolution families), whether it takes video records, its built-in
language-model shapes (for the analytic cost model) and its tiny test configuration.

Loading uses top-level `transformers` classes only (internals are in _hf.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


# The language model's attention implementations the CLIs take (--attn-implementation); the pruning engine wraps
# each (FastV and DART read layer K-1's query and key rows from the wrapper, never attention probabilities).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


def check_attn_implementation(name: str, device: str | torch.device | None = None,
                              dtype: torch.dtype | None = None) -> str:
    """`name` if the language model can run it here, before any model loads.

    Args:
        name: one of ATTN_IMPLEMENTATIONS.
        device: where the model will run (flash_attention_2 needs a CUDA device); None: not checked.
        dtype: the model's weights (flash_attention_2 runs fp16 / bf16 only: transformers passes fp32 queries of an
            fp32 model through, and the kernels refuse them); None: not checked.

    Raises:
        ValueError: an unknown name; flash_attention_2 without an importable flash-attn package, on a device that
            is not CUDA, or with fp32 weights.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        import importlib  # noqa: PLC0415

        try:
            importlib.import_module("flash_attn")
        except (ImportError, OSError) as error:  # a broken build raises OSError for its CUDA libraries
            raise ValueError("attn_implementation flash_attention_2 needs the flash-attn package, which cannot be "
                             f"imported here ({type(error).__name__}: {' '.join(str(error).split())}): pip install "
                             "flash-attn, or use sdpa") from None
        if device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"attn_implementation flash_attention_2 runs on CUDA devices only, not {device}")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attn_implementation flash_attention_2 runs in float16 or bfloat16 only, not "
                             f"{str(dtype).removeprefix('torch.')}")
    return name


def set_text_attn_implementation(model, name: str) -> None:
    """Switches the language model of a loaded model to attention `name` (the vision tower keeps its own)."""
    from . import _hf  # noqa: PLC0415

    _hf.set_text_attention_implementation(model, model.config.get_text_config(), name)


@dataclass(frozen=True)
class LMShape:
    """The dimensions of a Llama-style language model that FLOPs and KV bytes depend on (epic_ext.cost)."""

    name: str
    layers: int
    hidden: int  # d
    intermediate: int  # m (SwiGLU width)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    visual_tokens: int = 576  # per sample: one image (LLaVA-1.5), or a typical anyres / dynamic count (see below)
    family: str = "llava"  # the transformers model_type of the multimodal model


BACKENDS = ("auto", "official", "fallback")


def _official(backend: str) -> bool:
    """Whether inputs come from the checkpoint's own processor: "auto" where torchvision is importable."""
    from . import _hf  # noqa: PLC0415

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "official" and not _hf.torchvision_available():
        raise ValueError("backend='official' needs an importable torchvision (the checkpoints' video processors and "
                         "torchvision image backends need it)")
    return backend == "official" or (backend == "auto" and _hf.torchvision_available())


def _llava_processor(family: Family, path: str, backend: str = "auto"):
    """The checkpoint's AutoProcessor (LlavaProcessor / LlavaNextProcessor): its torchvision image backend where
    torchvision is importable; the fallback asks for its PIL backend."""
    from ..data.chat import note_fallback  # noqa: PLC0415
    from . import _hf  # noqa: PLC0415

    if _official(backend):
        return _hf.auto_processor(path, pil=False, processor_class=family.processor_class)
    note_fallback(f"{family.title} image", "the checkpoint's processor with its PIL image backend")
    return _hf.auto_processor(path, pil=True, processor_class=family.processor_class)


def _chat_processor(family: Family, path: str, backend: str = "auto"):
    """A ChatProcessor around the checkpoint's AutoProcessor (torchvision importable), or the fallback's (the PIL
    image processor, the video processor re-implemented in epic_ext.data.video)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from ..data.chat import ChatProcessor  # noqa: PLC0415
    from . import _hf  # noqa: PLC0415

    config = AutoConfig.from_pretrained(path) if family.anyres_layout else None
    if _official(backend):
        official = _hf.auto_processor(path, pil=False, processor_class=family.processor_class)
        missing = [part for part in ("image_processor", "tokenizer") + (("video_processor",) if family.videos else ())
                   if getattr(official, part, None) is None]
        if missing:
            raise ValueError(f"{path}: AutoProcessor built a {type(official).__name__} without {', '.join(missing)}: "
                             "the checkpoint lacks its processor_config.json (processor_class) or "
                             "preprocessor_config.json")
        return ChatProcessor.from_pretrained(path, official=official,
                                             videos=family.videos, onevision_config=config,
                                             video_type=family.video_type)
    return ChatProcessor.from_pretrained(path, image_processor=_hf.image_processor_from_pretrained(path, pil=True),
                                         videos=family.videos, onevision_config=config, video_type=family.video_type)


def _llava_dataset(records, image_folder, processor, **kwargs):
    from ..data.llava import LlavaDataset  # noqa: PLC0415

    return LlavaDataset(records, image_folder, processor, **kwargs)


def _chat_dataset(records, image_folder, processor, **kwargs):
    from ..data.chat import ChatDataset  # noqa: PLC0415

    return ChatDataset(records, image_folder, processor, **kwargs)


@dataclass(frozen=True)
class Family:
    """One supported checkpoint family.

    Attributes:
        name: the family's short name in messages ("llava", "qwen2_5_vl", ...).
        title: its name in prose ("LLaVA-1.5", "Qwen2.5-VL", ...).
        model_type: config.json's `model_type`.
        model_class: the transformers *ForConditionalGeneration class name.
        adapter: the module of epic_ext.models that registers its FamilyAdapter.
        processor_factory: (family, checkpoint path, backend) -> the processor training and evaluation build
            inputs with (backend: "auto", "official" or "fallback", see load_processor).
        dataset_factory: (records, image_folder, processor, **options) -> the training dataset; None: the family
            cannot be trained yet.
        per_image_budget: True: every image gives config.image_seq_length visual tokens, so `keep` can default to
            fractions of it (LLaVA-1.5); False: anyres / dynamic resolution, the count varies per sample and a
            `keep` is per sample over all its visual tokens.
        videos: training and evaluation take records with a ``video`` (frame list).
        uniform_video_frames: a batch holds videos of one frame count only (LLaVA-OneVision).
        anyres_layout: its processor needs the model config's anyres layout (LLaVA-OneVision).
        video_type: its video processor class (the fallback's resize rule and prompt, epic_ext.data.video).
        processor_class: its transformers processor class, built when the checkpoint names none (no
            processor_class in processor_config.json / preprocessor_config.json / tokenizer_config.json).
        shapes: built-in language-model shapes of released checkpoints (epic_ext.cost, `python -m
            epic_ext.efficiency --model NAME`).
        tiny: the builder in epic_ext.models.tiny of a tiny random model of the family (tests, CPU smoke runs).
    """

    name: str
    title: str
    model_type: str
    model_class: str
    adapter: str
    processor_factory: Callable
    dataset_factory: Callable | None
    per_image_budget: bool
    tiny: str
    videos: bool = False
    uniform_video_frames: bool = False
    anyres_layout: bool = False
    video_type: str | None = None
    processor_class: str | None = None
    shapes: tuple[LMShape, ...] = field(default=())

    @property
    def trainable(self) -> bool:
        return self.dataset_factory is not None

    def load_model(self, path: str, dtype: torch.dtype, *, attn_implementation: str | None = None, **kwargs):
        """`<model_class>.from_pretrained(path, dtype=dtype, **kwargs)`.

        Args:
            attn_implementation: the language model's attention (one of ATTN_IMPLEMENTATIONS, checked with
                check_attn_implementation before any weight is read); the vision tower keeps transformers' default.
                None: transformers' default for both (sdpa).
        """
        import transformers  # noqa: PLC0415

        if attn_implementation is not None:
            check_attn_implementation(attn_implementation)
        model = getattr(transformers, self.model_class).from_pretrained(path, dtype=dtype, **kwargs)
        if attn_implementation is not None:
            set_text_attn_implementation(model, attn_implementation)
        return model

    def load_processor(self, path: str, backend: str = "auto"):
        """The processor of the checkpoint at `path` (its AutoProcessor for LLaVA-1.5 / NeXT, a ChatProcessor for
        the chat-template families).

        Args:
            backend: "official": the checkpoint's own processor (AutoProcessor with its torchvision image and video
                processors; needs torchvision); "fallback": epic_ext's path without torchvision (PIL image
                processor, video processor re-implemented); "auto": official where torchvision is importable.
        """
        return self.processor_factory(self, path, backend)

    def dataset(self, records, image_folder, processor, **kwargs):
        """The family's training dataset (epic_ext.data.llava.LlavaDataset or epic_ext.data.chat.ChatDataset).

        Raises:
            ValueError: a family that cannot be trained yet.
        """
        if self.dataset_factory is None:
            raise ValueError(f"{self.name} models cannot be trained yet; trainable families: "
                             f"{describe(TRAINABLE)}")
        return self.dataset_factory(records, image_folder, processor, **kwargs)

    def visual_tokens_per_image(self, config) -> int | None:
        """Visual tokens one image gives (config.image_seq_length) for a per-image budget; None for families whose
        count varies with the image size."""
        return config.image_seq_length if self.per_image_budget else None

    def build_tiny(self, **kwargs):
        """A tiny random model of the family (epic_ext.models.tiny)."""
        from . import tiny  # noqa: PLC0415

        return getattr(tiny, f"build_tiny_{self.tiny}")(**kwargs)

    def tiny_config(self, **kwargs):
        """The tiny model's transformers config (epic_ext.models.tiny)."""
        from . import tiny  # noqa: PLC0415

        return getattr(tiny, f"tiny_{self.tiny}_config")(**kwargs)


# The language models' dimensions, from the released checkpoints' config.json (transformers ports):
# - llava-1.5-7b / -13b: Vicuna-7B / -13B, vocab 32064 (32000 + <image> + padding to 64). 576 = (336 / 14)^2.
# - llava-next-vicuna-7b (llava-hf/llava-v1.6-vicuna-7b-hf): Vicuna-7B as above. llava-next-mistral-7b
#   (llava-hf/llava-v1.6-mistral-7b-hf): Mistral-7B-Instruct-v0.2, 14336 MLP, 8 KV heads, vocab 32064. 2928 visual
#   tokens = a 672x672 image: base crop 576 + a 2x2 grid of 336-px crops (48 x 48 = 2304) + 48 newline slots (the
#   image feature size vLLM's configs use for these checkpoints).
# - llava-onevision-7b (llava-hf/llava-onevision-qwen2-7b-ov-hf): Qwen2-7B-Instruct (28 layers, d 3584, MLP 18944,
#   28 heads / 4 KV heads of 128), vocab 152128 (152064 + <image>, <video>, padded to 64 by the conversion script).
#   3699 visual tokens = a 768x768 image: base 729 = (384 / 14)^2 + a 2x2 grid of 384-px crops (54 x 54 = 2916) + 54
#   newline slots. A video costs 196 tokens per frame (27 x 27 pooled to 14 x 14) + 1: 32 frames = 6273.
# - qwen2.5-vl-7b (Qwen/Qwen2.5-VL-7B-Instruct): 28 layers, d 3584, MLP 18944, 28 heads / 4 KV heads of 128, vocab
#   152064 (its module printout: embed_tokens 152064 x 3584, k_proj 3584 -> 512). 1296 visual tokens = a 1008x1008
#   image: (1008 / 14)^2 patches merged 2x2.
# - qwen3-vl-8b (Qwen/Qwen3-VL-8B-Instruct): Qwen3-8B text model, 36 layers, d 4096, MLP 12288, 32 heads / 8 KV heads
#   of 128, vocab 151936 (torchtitan's Qwen3-VL 8B flavour mirrors the config). 1024 visual tokens = a 1024x1024
#   image: (1024 / 16)^2 patches merged 2x2.
LLAVA = Family("llava", "LLaVA-1.5", "llava", "LlavaForConditionalGeneration", adapter="llava",
               processor_factory=_llava_processor, dataset_factory=_llava_dataset, per_image_budget=True, tiny="llava",
               processor_class="LlavaProcessor",
               shapes=(LMShape("llava-1.5-7b", 32, 4096, 11008, 32, 32, 128, 32064),  # Vicuna-7B
                       LMShape("llava-1.5-13b", 40, 5120, 13824, 40, 40, 128, 32064)))  # Vicuna-13B
LLAVA_NEXT = Family("llava_next", "LLaVA-NeXT", "llava_next", "LlavaNextForConditionalGeneration",
                    adapter="llava_next", processor_factory=_llava_processor, dataset_factory=_llava_dataset,
                    per_image_budget=False,
                    tiny="llava_next",
                    processor_class="LlavaNextProcessor",
               shapes=(LMShape("llava-next-vicuna-7b", 32, 4096, 11008, 32, 32, 128, 32064, 2928, "llava_next"),
                            LMShape("llava-next-mistral-7b", 32, 4096, 14336, 32, 8, 128, 32064, 2928,
                                    "llava_next")))
LLAVA_ONEVISION = Family("llava_onevision", "LLaVA-OneVision", "llava_onevision",
                         "LlavaOnevisionForConditionalGeneration", adapter="llava_onevision", processor_factory=_chat_processor, dataset_factory=_chat_dataset,
                         per_image_budget=False, tiny="llava_onevision", videos=True, uniform_video_frames=True,
                         anyres_layout=True, video_type="LlavaOnevisionVideoProcessor",
                         processor_class="LlavaOnevisionProcessor",
               shapes=(LMShape("llava-onevision-7b", 28, 3584, 18944, 28, 4, 128, 152128, 3699,
                                         "llava_onevision"),))
QWEN2_5_VL = Family("qwen2_5_vl", "Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                    adapter="qwen_vl", processor_factory=_chat_processor, dataset_factory=_chat_dataset, per_image_budget=False,
                    tiny="qwen2_5_vl", videos=True, video_type="Qwen2VLVideoProcessor",
                    processor_class="Qwen2_5_VLProcessor",
               shapes=(LMShape("qwen2.5-vl-7b", 28, 3584, 18944, 28, 4, 128, 152064, 1296, "qwen2_5_vl"),))
QWEN3_VL = Family("qwen3_vl", "Qwen3-VL", "qwen3_vl", "Qwen3VLForConditionalGeneration", adapter="qwen_vl",
                  processor_factory=_chat_processor, dataset_factory=_chat_dataset, per_image_budget=False,
                  tiny="qwen3_vl", videos=True, video_type="Qwen3VLVideoProcessor",
                  processor_class="Qwen3VLProcessor",
               shapes=(LMShape("qwen3-vl-8b", 36, 4096, 12288, 32, 8, 128, 151936, 1024, "qwen3_vl"),))

# model_type -> Family, in the order messages list them
FAMILIES: dict[str, Family] = {family.model_type: family
                               for family in (LLAVA, QWEN2_5_VL, QWEN3_VL, LLAVA_ONEVISION, LLAVA_NEXT)}
# the families `python -m epic_ext.train` and `python -m epic_ext.eval` load
TRAINABLE: dict[str, Family] = {key: family for key, family in FAMILIES.items() if family.trainable}


def describe(families: dict[str, Family] = TRAINABLE) -> str:
    """`llava (LlavaForConditionalGeneration), qwen2_5_vl (...)`: for error messages."""
    return ", ".join(f"{family.model_type} ({family.model_class})" for family in families.values())


def family_of(config, families: dict[str, Family] = TRAINABLE) -> Family:
    """The family of a transformers config (its `model_type`), or of a model (its config).

    Raises:
        ValueError: an unsupported model type; the message lists the supported families.
    """
    config = getattr(config, "config", config) if isinstance(config, torch.nn.Module) else config
    return _family_of_type(getattr(config, "model_type", None), families)


def _family_of_type(model_type: str | None, families: dict[str, Family]) -> Family:
    if model_type not in families:
        raise ValueError(f"a {model_type!r} model is not supported; supported families (model_type): "
                         f"{describe(families)}")
    return families[model_type]


def family_of_checkpoint(path: str, families: dict[str, Family] = TRAINABLE) -> Family:
    """The family of a checkpoint directory (its config.json's model_type, read as JSON: no transformers config
    class is built) or of a Hub id (AutoConfig)."""
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
        return _family_of_type(model_type, families)
    from transformers import AutoConfig  # noqa: PLC0415

    return family_of(AutoConfig.from_pretrained(path), families)


def load_model(path: str, family: Family, dtype: torch.dtype, attn_implementation: str | None = None):
    """`<family.model_class>.from_pretrained(path, dtype=dtype)` (see Family.load_model)."""
    return family.load_model(path, dtype, attn_implementation=attn_implementation)


def load_processor(path: str, family: Family | None = None):
    """The processor of a checkpoint directory for its family (worked out from config.json when not given)."""
    return (family or family_of_checkpoint(path)).load_processor(path)


def builtin_shapes() -> dict[str, LMShape]:
    """Every family's built-in language-model shapes, by name."""
    return {shape.name: shape for family in FAMILIES.values() for shape in family.shapes}


def _unique(modules: list[torch.nn.Module | None]) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def parameter_parts(model) -> dict[str, list[torch.nn.Parameter]]:
    """The model's parameters as {"vision": ..., "projector": ..., "llm": ...}, every parameter in exactly one part.

    LLaVA, LLaVA-NeXT and LLaVA-OneVision: vision_tower / multi_modal_projector (+ NeXT's and OneVision's
    image_newline, through the rule below) / language_model + lm_head. Qwen2.5-VL and Qwen3-VL: the vision
    transformer `visual` minus its patch merger(s) / `visual.merger` (+ Qwen3-VL's `deepstack_merger_list`) /
    language_model + lm_head. A parameter outside these (the image_newline embedding) goes to the projector.

    Raises:
        ValueError: a model without a language_model or a vision module.
    """
    inner = model.model
    language = getattr(inner, "language_model", None)
    vision = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    if language is None or vision is None:
        raise ValueError(f"parameter_parts: {type(model).__name__} has no language_model / vision module")
    projector_modules = [getattr(inner, "multi_modal_projector", None), getattr(vision, "merger", None),
                         getattr(vision, "deepstack_merger_list", None)]
    projector = _unique(projector_modules)
    llm = _unique([language, model.get_output_embeddings()])
    taken = {id(p) for p in projector} | {id(p) for p in llm}
    vision_params = [p for p in _unique([vision]) if id(p) not in taken]
    taken |= {id(p) for p in vision_params}
    projector += [p for p in _unique([model]) if id(p) not in taken]
    return {"vision": vision_params, "projector": projector, "llm": llm}
