"""Hugging Face integration: visual-token compression inside multimodal LLMs (transformers 5.x).

`apply_compression` dispatches on the model's class to its family's adapter (one module per family, each registered
with adapter.register_adapter on import); `supported_classes()` lists what it accepts. What else a family is
(classes, processor, datasets, token budget, built-in shapes) is in families.py.
"""

from . import llava, llava_next, llava_onevision, qwen_vl  # noqa: F401  (each registers its adapter)
from .adapter import FamilyAdapter, register_adapter, supported_classes
from .engine import CompressionHandle, apply_compression, prompt_query_positions

__all__ = ["apply_compression", "CompressionHandle", "prompt_query_positions", "FamilyAdapter", "register_adapter",
           "supported_classes"]
