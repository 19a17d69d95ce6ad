"""LLaVA-1.5 adapter: LlavaForConditionalGeneration / LlavaModel (transformers 5.x).

The smallest complete FamilyAdapter (see adapter.py for the interface and engine.py for how the engine hooks in):
- the pre-hooked module is the LlavaModel (`model.model`, or the model itself when a LlavaModel is given): it sees
  `input_ids` before the image features are merged into `inputs_embeds`;
- the patched language model is its `language_model` (a LlamaModel for llava-1.5 checkpoints);
- visual tokens are `input_ids == config.image_token_id` (older configs: `image_token_index`), per sample; with
  embeddings only, the rows equal to that token's embedding;
- positions are 1-D ([B|1, L]), the engine's defaults.
"""

from __future__ import annotations


from .adapter import FamilyAdapter, register_adapter


def image_token_id(config) -> int | None:
    """config.image_token_id, or image_token_index in older LLaVA configs."""
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5: one image placeholder id, 1-D positions."""

    name = "llava"
    model_class_names = ("LlavaForConditionalGeneration", "LlavaModel")

    def visual_token_ids(self, config) -> tuple[int, ...]:
        token = image_token_id(config)
        return () if token is None else (token,)


ADAPTER = register_adapter(LlavaAdapter())
