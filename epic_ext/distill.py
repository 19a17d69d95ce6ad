"""EPIC's loss: (1 - lambda) * SFT + lambda * tau^2 * KL(teacher || student), teacher = the same weights at a
lower compression, no gradient.

Rows are aligned without scattering logits back to the unpruned length: both passes keep every text token, so the
supervised positions (those whose next token has a label) appear in both pruned sequences, in the same order. Each
pass gathers its hidden states at those positions and only those rows go through the lm_head. The KL runs through
epic_ext.ops.temperature_kl (fused, fp32 accumulation, gradient computed in the forward).

Normalisation: the pass returns sums; the caller divides by the number of supervised tokens of the whole
optimizer step (all micro-batches and ranks), so gradient accumulation and data parallelism give the gradient of
one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .models import CompressionHandle, prompt_query_positions
from .schedules import CompressionStep

__all__ = ["DistillConfig", "shifted_targets", "distillation_loss", "MODEL_INPUT_KEYS", "visual_mask"]

# Batch entries handed to the multimodal model besides input_ids / attention_mask (those present and not None):
# LLaVA's pixel_values; Qwen-VL's pixel_values + image_grid_thw, mm_token_type_ids (its M-RoPE positions) and a
# video's pixel_values_videos + video_grid_thw + second_per_grid_ts; LLaVA-NeXT's image_sizes; LLaVA-OneVision's
# image_sizes and batch_num_images (anyres for single-image samples only).
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                    "second_per_grid_ts", "image_sizes", "batch_num_images")


@dataclass(frozen=True)
class DistillConfig:
    """lam: weight of the KD term (paper: 0.7; 0 = plain SFT, no teacher pass). tau: temperature."""

    lam: float = 0.7
    tau: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"DistillConfig: lam must be in [0, 1], got {self.lam}")
        if not self.tau > 0.0:
            raise ValueError(f"DistillConfig: tau must be > 0, got {self.tau}")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:  # noqa: D401
    """[B, L] targets in original positions: targets[:, i] = labels[:, i + 1] (position i predicts token i + 1),
    -100 at the end."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def visual_mask(handle: CompressionHandle, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the visual placeholder tokens of the handle's family (image, video)."""
    ids = handle.adapter.visual_token_ids(handle.config)
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


def _supervised_rows(handle: CompressionHandle, model, batch: dict, targets: torch.Tensor, ratio: float, layer: int,
                     query_positions: torch.Tensor):
    """One pass at (ratio, layer); returns (hidden rows [N, D] at supervised positions, their targets [N])."""
    num_layers = handle.language_model.config.num_hidden_layers
    if layer >= num_layers or ratio <= 0.0:
        override = handle.override(ratio=0.0)
    else:
        override = handle.override(ratio=ratio, layer=layer, query_positions=query_positions)
    inputs = {key: batch[key] for key in MODEL_INPUT_KEYS if batch.get(key) is not None}
    with override:
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                          **inputs)
        kept = handle.last_kept_positions
    hidden = out.last_hidden_state  # [B, L', D]
    if kept is None:
        kept = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
    row_targets = torch.where(kept >= 0, targets.gather(1, kept.clamp(min=0)), torch.full_like(kept, -100))
    supervised = row_targets != -100
    return hidden[supervised], row_targets[supervised]


def distillation_loss(model, handle: CompressionHandle, batch: dict, step: CompressionStep,
                      config: DistillConfig, normalizer: float | torch.Tensor) -> dict:
    """Student pass (with grad) at step.student_*, teacher pass (no grad) at step.teacher_*; the combined loss.

    Args:
        model: a supported multimodal model patched by apply_compression (handle).
        batch: input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 = not supervised), and the model's
            visual inputs (MODEL_INPUT_KEYS: pixel_values; Qwen-VL also image_grid_thw, mm_token_type_ids).
        step: the schedule's CompressionStep for this optimizer step.
        normalizer: what the summed losses are divided by (supervised tokens of the optimizer step, scaled for
            the number of micro-batches and ranks by the caller); clamped to >= 1.

    Returns:
        dict with "loss" (differentiable scalar), and detached "sft_sum", "kd_sum", "tokens".
    """
    labels = batch["labels"]
    # A visual position may be dropped by either pass, so the token after it is not a distillation row (never the
    # case in LLaVA prompts, where "ASSISTANT:" separates images from answers, nor in chat templates).
    image_mask = visual_mask(handle, batch["input_ids"])
    targets = shifted_targets(labels).masked_fill(image_mask, -100)
    query_positions = prompt_query_positions(batch["attention_mask"], labels)
    lm_head = model.get_output_embeddings()
    student_rows, row_targets = _supervised_rows(handle, model, batch, targets, step.student_ratio,
                                                 step.student_layer, query_positions)
    student_logits = lm_head(student_rows)  # [N, V]
    sft_sum = torch.nn.functional.cross_entropy(student_logits.float(), row_targets, reduction="sum")
    kd_sum = torch.zeros((), device=sft_sum.device)
    if config.lam > 0.0:
        with torch.no_grad():
            teacher_rows, teacher_targets = _supervised_rows(handle, model, batch, targets, step.teacher_ratio,
                                                             step.teacher_layer, query_positions)
            teacher_logits = lm_head(teacher_rows)
        if teacher_rows.shape[0] != student_rows.shape[0] or not torch.equal(teacher_targets, row_targets):
            raise RuntimeError("distillation: teacher and student passes disagree on the supervised rows")
        kd_sum = ops.temperature_kl(student_logits, teacher_logits, temperature=config.tau, reduction="sum")
    if torch.is_tensor(normalizer):
        normalizer = normalizer.clamp(min=1.0)
    else:
        normalizer = max(float(normalizer), 1.0)
    loss = ((1.0 - config.lam) * sft_sum + config.lam * kd_sum) / normalizer
    return {"loss": loss, "sft_sum": sft_sum.detach(), "kd_sum": kd_sum.detach(),
            "tokens": torch.tensor(row_targets.numel(), device=sft_sum.device)}
