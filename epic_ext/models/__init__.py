"""Hugging Face integration: visual-token compression inside LLaVA (transformers 5.x)."""

from .llava import CompressionHandle, apply_compression, prompt_query_positions

__all__ = ["apply_compression", "CompressionHandle", "prompt_query_positions"]
