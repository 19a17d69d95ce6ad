"""Model families `python -m epic_ext.train` / `epic_ext.eval` load by name: which transformers class a checkpoint's
config.json (`model_type`) maps to, how its prompts are built, and how its parameters split into vision tower,
projector and language model (the learning-rate / freezing groups of training).

Loading uses top-level `transformers` classes only (no internals).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    """One supported checkpoint family.

    Attributes:
        name: the family's name in messages ("llava", "qwen2_5_vl", ...).
        model_type: config.json's `model_type`.
        model_class: the transformers *ForConditionalGeneration class name.
        chat_template: prompts come from the checkpoint's chat template (False: LLaVA-1.5's own
            ``USER: ... ASSISTANT:`` format and its LlavaProcessor).
        videos: training and evaluation take records with a ``video`` (frame list).
    """

    name: str
    model_type: str
    model_class: str
    chat_template: bool
    videos: bool = False


LLAVA = Family("llava", "llava", "LlavaForConditionalGeneration", chat_template=False)
QWEN2_5_VL = Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", chat_template=True,
                    videos=True)
QWEN3_VL = Family("qwen3_vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", chat_template=True)
LLAVA_ONEVISION = Family("llava_onevision", "llava_onevision", "LlavaOnevisionForConditionalGeneration",
                         chat_template=True, videos=True)

# model_type -> Family, in the order messages list them
TRAINABLE: dict[str, Family] = {family.model_type: family
                                for family in (LLAVA, QWEN2_5_VL, QWEN3_VL, LLAVA_ONEVISION)}


def describe(families: dict[str, Family] = TRAINABLE) -> str:
    """`llava (LlavaForConditionalGeneration), qwen2_5_vl (...)`: for error messages."""
    return ", ".join(f"{family.model_type} ({family.model_class})" for family in families.values())


def family_of(config, families: dict[str, Family] = TRAINABLE) -> Family:
    """The family of a transformers config (its `model_type`).

    Raises:
        ValueError: an unsupported model type; the message lists the supported families.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in families:
        raise ValueError(f"a {model_type!r} model is not supported; supported families (model_type): "
                         f"{describe(families)}")
    return families[model_type]


def load_model(path: str, family: Family, dtype: torch.dtype):
    """`<family.model_class>.from_pretrained(path, dtype=dtype)`."""
    import transformers  # noqa: PLC0415

    return getattr(transformers, family.model_class).from_pretrained(path, dtype=dtype)


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

    LLaVA and LLaVA-OneVision: vision_tower / multi_modal_projector (+ OneVision's image_newline) /
    language_model + lm_head. Qwen2.5-VL and Qwen3-VL: the vision
    transformer `visual` minus its patch merger(s) / `visual.merger` (+ Qwen3-VL's `deepstack_merger_list`) /
    language_model + lm_head. A parameter outside these (none today) goes to the projector.

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
