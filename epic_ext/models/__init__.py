"""Hugging Face integration: visual-token compression inside multimodal LLMs (transformers 5.x).

`apply_compression` dispatches on the model's class to its family's adapter (one module per family, each registered
with engine.register_adapter on import); `supported_classes()` lists what it accepts.
"""

from . import llava, llava_next, llava_onevision  # noqa: F401  (each registers its adapter)
from . import qwen_vl  # noqa: F401  (registers the Qwen2.5-VL and Qwen3-VL adapters)
from .engine import (CompressionHandle, FamilyAdapter, apply_compression, prompt_query_positions, register_adapter,
                     supported_classes)

__all__ = ["apply_compression", "CompressionHandle", "prompt_query_positions", "FamilyAdapter", "register_adapter",
           "supported_classes"]
