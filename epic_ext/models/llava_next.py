"""LLaVA-NeXT (LLaVA-1.6) adapter: LlavaNextForConditionalGeneration / LlavaNextModel (transformers 5.x).

Same plumbing as LLaVA-1.5 (llava.py): the LlavaNextModel is pre-hooked for the input ids, its `language_model` (Llama,
Mistral, Qwen2, ... for the released checkpoints) is patched, positions are 1-D. What the family adds:
- anyres: each image is a base crop plus a grid of crops, so samples with different image sizes have different
  numbers of visual tokens. The processor writes one `image_token_id` per visual feature, so the visual mask comes
  from the ids alone, per sample, whatever the sizes.
- `image_newline` slots: the model appends a learned newline embedding after each row of the unpadded crop grid;
  these slots carry `image_token_id` too and sit inside the visual span. They are visual tokens here: the
  compressors rank them like any other visual token and may drop them. Keeping them would need the grid layout of
  each image (image_sizes and the pinpoints) inside the engine, and dropping them costs the model no position
  information: every kept token keeps its original position id. `keep` / `ratio` count them.
"""

from __future__ import annotations

from .adapter import register_adapter
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: one image placeholder id (newline slots included), 1-D positions."""

    name = "llava_next"
    model_class_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")


ADAPTER = register_adapter(LlavaNextAdapter())
