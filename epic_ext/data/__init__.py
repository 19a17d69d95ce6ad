"""Data shared by training and evaluation: LLaVA-format records and their checks (records.py), the skip policy's
reasons, LLaVA-1.5 samples and batches (llava.py), the chat-template families' samples (chat.py) and
LLaVA-OneVision's token-count rules (onevision.py).

Nothing here imports the models, the trainer or the evaluator: a family (epic_ext.models.families) hands this
package what depends on the checkpoint (its processor, image processor and config).
"""

from .llava import LlavaCollator, LlavaDataset, collate
from .records import (IGNORE_INDEX, IMAGE_PLACEHOLDER, SKIP_REASONS, VIDEO_PLACEHOLDER, ImageLoadError, image_names,
                      load_records, placeholder_problem, scan_records, video_frames)

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "SKIP_REASONS", "ImageLoadError", "image_names",
           "video_frames", "placeholder_problem", "scan_records", "load_records", "LlavaDataset", "LlavaCollator",
           "collate"]
