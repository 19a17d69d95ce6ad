"""Compression schedules of EPIC: TCD, LCD, both together, and fixed (the plain compressed fine-tuning baseline).

Every schedule is a pure function of (step, total_steps, seed): the random draws of step t come from a generator
seeded with (seed, t), so a resumed run samples exactly the values an uninterrupted run would have, with no
generator state to checkpoint.

Progress p = step / total_steps in [0, 1].
- TCD (token consistency distillation): student ratio ~ U[min(p), max(p)] with min = 0.1 + 0.16 p and
  max = 0.1 + 0.64 p; the teacher (same weights) runs at max(student - gap(p), 0), gap = min(0.1 + 0.5 p, 0.3).
  These are the constants of the authors' release; all are configurable.
- LCD (layer consistency distillation): a fixed target ratio; the compression layer moves from deep to shallow,
  l_t = round(L - p (L - l_min)), where l_t = L means "after the last layer" (no compression). The teacher prunes
  at the same layer with the ratio lowered by gap(p). (The authors did not release LCD; this follows the paper.)
- TCD+LCD: both progressions at once (not in the paper).
- fixed: student at the target ratio and layer every step; teacher at `teacher_ratio` (default 0: all tokens).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

__all__ = ["ScheduleConfig", "CompressionStep", "compression_at", "SCHEDULES"]

SCHEDULES = ("tcd", "lcd", "tcd+lcd", "fixed")


@dataclass(frozen=True)
class ScheduleConfig:
    """Knobs of every schedule (unused ones are ignored by a given kind).

    Attributes:
        kind: "tcd", "lcd", "tcd+lcd" or "fixed".
        num_layers: L, decoder layers of the language model.
        layer: K for schedules that keep the layer fixed (tcd, fixed).
        min_layer: l_min, the shallowest layer LCD reaches.
        target_ratio: the ratio of lcd and fixed.
        ratio_min_start / ratio_min_slope: min(p) = start + slope * p (TCD).
        ratio_max_start / ratio_max_slope: max(p) = start + slope * p (TCD).
        gap_start / gap_slope / gap_max: gap(p) = min(start + slope * p, gap_max).
        teacher_ratio: the teacher's ratio for "fixed" (None: target_ratio - gap(p), like the others).
        seed: base seed of the per-step draws.
    """

    kind: str = "tcd"
    num_layers: int = 32
    layer: int = 2
    min_layer: int = 2
    target_ratio: float = 0.778
    ratio_min_start: float = 0.1
    ratio_min_slope: float = 0.16
    ratio_max_start: float = 0.1
    ratio_max_slope: float = 0.64
    gap_start: float = 0.1
    gap_slope: float = 0.5
    gap_max: float = 0.3
    teacher_ratio: float | None = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if self.num_layers < 1:
            raise ValueError(f"schedule num_layers must be >= 1, got {self.num_layers}")
        if not 0 <= self.layer < self.num_layers:
            raise ValueError(f"schedule layer must be in [0, {self.num_layers - 1}], got {self.layer}")
        if not 0 <= self.min_layer <= self.num_layers:
            raise ValueError(f"schedule min_layer must be in [0, {self.num_layers}], got {self.min_layer}")
        if not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(f"schedule target_ratio must be in [0, 1), got {self.target_ratio}")
        if self.teacher_ratio is not None and not 0.0 <= self.teacher_ratio < 1.0:
            raise ValueError(f"schedule teacher_ratio must be in [0, 1) or None, got {self.teacher_ratio}")
        for name in ("ratio_min_start", "ratio_max_start", "gap_start", "gap_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"schedule {name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class CompressionStep:
    """What one training step runs: the student's and the teacher's ratio and layer (layer == num_layers means
    no compression)."""

    progress: float
    student_ratio: float
    student_layer: int
    teacher_ratio: float
    teacher_layer: int

    def as_dict(self) -> dict:
        return asdict(self)


def _gap(cfg: ScheduleConfig, p: float) -> float:
    return min(cfg.gap_start + cfg.gap_slope * p, cfg.gap_max)


def _clamp_ratio(value: float) -> float:
    return min(max(value, 0.0), 0.999)


def _tcd_ratio(cfg: ScheduleConfig, p: float, rng: random.Random) -> float:
    low = cfg.ratio_min_start + cfg.ratio_min_slope * p
    high = cfg.ratio_max_start + cfg.ratio_max_slope * p
    return _clamp_ratio(rng.uniform(min(low, high), max(low, high)))


def _lcd_layer(cfg: ScheduleConfig, p: float) -> int:
    return int(round(cfg.num_layers - p * (cfg.num_layers - cfg.min_layer)))


def compression_at(step: int, total_steps: int, cfg: ScheduleConfig) -> CompressionStep:
    """The compression of training step `step` (0-based) out of `total_steps`.

    Args:
        step: current optimizer step, 0 <= step <= total_steps.
        total_steps: T > 0.
        cfg: the schedule.

    Returns:
        CompressionStep with ratios in [0, 1) and layers in [0, num_layers].
    """
    if total_steps <= 0:
        raise ValueError(f"compression_at: total_steps must be > 0, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"compression_at: step must be in [0, {total_steps}], got {step}")
    p = step / total_steps
    rng = random.Random(cfg.seed * 1_000_003 + step)  # pure in (seed, step): resume-safe
    gap = _gap(cfg, p)
    if cfg.kind == "tcd":
        student = _tcd_ratio(cfg, p, rng)
        return CompressionStep(p, student, cfg.layer, _clamp_ratio(max(student - gap, 0.0)), cfg.layer)
    if cfg.kind == "lcd":
        layer = _lcd_layer(cfg, p)
        return CompressionStep(p, cfg.target_ratio, layer, _clamp_ratio(max(cfg.target_ratio - gap, 0.0)), layer)
    if cfg.kind == "tcd+lcd":
        student = _tcd_ratio(cfg, p, rng)
        layer = _lcd_layer(cfg, p)
        return CompressionStep(p, student, layer, _clamp_ratio(max(student - gap, 0.0)), layer)
    teacher = cfg.teacher_ratio if cfg.teacher_ratio is not None else max(cfg.target_ratio - gap, 0.0)
    return CompressionStep(p, cfg.target_ratio, cfg.layer, _clamp_ratio(teacher), cfg.layer)
