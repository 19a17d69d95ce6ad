"""Compression schedules of EPIC: TCD, LCD, ICD, TCD+LCD, and fixed (the plain compressed fine-tuning baseline).

Every schedule is a pure function of (step, total_steps, seed): the random draws of step t come from a generator
seeded with (seed, t), so a resumed run samples exactly the values an uninterrupted run would have, with no
generator state to checkpoint.

Progress p = step / total_steps in [0, 1].
- TCD (token consistency distillation): student ratio ~ U[min(p), max(p)] with min = min_start + min_slope p and
  max = max_start + max_slope p; the teacher (same weights) runs at max(student - gap(p), 0),
  gap = min(gap_start + gap_slope p, gap_max). The constants come from a named preset (CONSTANT_PRESETS: "release",
  the default, or "paper") and can be overridden field by field.
- LCD (layer consistency distillation): a fixed target ratio; the compression layer moves from deep to shallow,
  l_t = round(L - p (L - l_min)), where l_t = L means "after the last layer" (no compression). The teacher prunes
  at the same layer with the ratio lowered by gap(p). (The authors did not release LCD; this follows the paper.)
- ICD (integrated progressive consistency distillation, the paper's appendix, Table 5): training is cut into
  `icd_stages` equal stages; stage s compresses at layer icd_layers[s] (deep -> shallow; default
  round(L - (s + 1) / S (L - l_min)), e.g. 22, 12, 2 for L = 32, l_min = 2, S = 3), and within each stage the whole
  TCD progression (ratio range and gap) runs from its start to its end, restarting at each change of layer.
- TCD+LCD: both progressions at once over the whole run (our variant, not in the paper): the layer moves a little
  every step while the ratio grows once; ICD instead holds each layer for a stage and replays the ratio curriculum.
- fixed: student at the target ratio and layer every step; teacher at `teacher_ratio` (default 0: all tokens).
- progressive_ratio=False (tcd, icd, tcd+lcd): the student's range is the final one, [min(1), max(1)], from the
  first step (the paper's "w/o progressive compression ratio" ablation); the gap still grows.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

__all__ = ["ScheduleConfig", "CompressionStep", "compression_at", "icd_layers", "SCHEDULES", "CONSTANT_PRESETS",
           "DEFAULT_PRESET", "ResolvedConstants", "resolve_constants"]

SCHEDULES = ("tcd", "lcd", "icd", "tcd+lcd", "fixed")

# TCD constant sets. "paper": the paper's text (R_max grows linearly from eps = 5% to 90%; R_min grows more slowly,
# from 0 to 50%; the gap grows from delta_min, taken as eps = 5% so that the teacher starts at no compression, to
# 30%, linearly over the run; lambda 0.7; tau is not given, 1). "release": the authors' code (max 0.1 -> 0.74,
# min 0.1 -> 0.26, gap 0.1 -> 0.3 reached at p = 0.4, distillation weight 0.5 or 0.4 for Random, tau 1).
# The default is "release": it is fully specified (the paper's text leaves delta_min and the shape of the curves
# open, which the "paper" preset has to fill in) and it is the code the authors ran.
CONSTANT_PRESETS = {
    "paper": dict(schedule=dict(ratio_max_start=0.05, ratio_max_slope=0.85, ratio_min_start=0.0, ratio_min_slope=0.5,
                                gap_start=0.05, gap_slope=0.25, gap_max=0.3), lam=0.7, lam_random=0.7, tau=1.0),
    "release": dict(schedule=dict(ratio_max_start=0.1, ratio_max_slope=0.64, ratio_min_start=0.1, ratio_min_slope=0.16,
                                  gap_start=0.1, gap_slope=0.5, gap_max=0.3), lam=0.5, lam_random=0.4, tau=1.0),
}
DEFAULT_PRESET = "release"


@dataclass(frozen=True)
class ScheduleConfig:
    """Knobs of every schedule (unused ones are ignored by a given kind). The TCD defaults are the release preset.

    Attributes:
        kind: "tcd", "lcd", "icd", "tcd+lcd" or "fixed".
        num_layers: L, decoder layers of the language model.
        layer: K for schedules that keep the layer fixed (tcd, fixed).
        min_layer: l_min, the shallowest layer LCD (and ICD's default layers) reach.
        target_ratio: the ratio of lcd and fixed.
        ratio_min_start / ratio_min_slope: min(p) = start + slope * p (TCD).
        ratio_max_start / ratio_max_slope: max(p) = start + slope * p (TCD).
        gap_start / gap_slope / gap_max: gap(p) = min(start + slope * p, gap_max).
        progressive_ratio: False samples the student ratio from the final range [min(1), max(1)] from step 0.
        icd_stages: S, the stages of ICD (one compression layer each).
        icd_layers: ICD's layer per stage, deep to shallow (strictly decreasing, in [0, L - 1]; their count is the
            number of stages); empty: icd_stages layers round(L - (s + 1) / S (L - l_min)), s = 0 .. S - 1.
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
    progressive_ratio: bool = True
    icd_stages: int = 3
    icd_layers: tuple[int, ...] = ()
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
        if not isinstance(self.progressive_ratio, bool):
            raise ValueError(f"schedule progressive_ratio must be true or false, got {self.progressive_ratio!r}")
        if isinstance(self.icd_stages, bool) or not isinstance(self.icd_stages, int) or self.icd_stages < 1:
            raise ValueError(f"schedule icd_stages must be an int >= 1, got {self.icd_stages!r}")
        object.__setattr__(self, "icd_layers", tuple(self.icd_layers))  # JSON gives a list
        if self.kind == "icd":
            icd_layers(self)  # validates


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
    p = p if cfg.progressive_ratio else 1.0
    low = cfg.ratio_min_start + cfg.ratio_min_slope * p
    high = cfg.ratio_max_start + cfg.ratio_max_slope * p
    return _clamp_ratio(rng.uniform(min(low, high), max(low, high)))


def _lcd_layer(cfg: ScheduleConfig, p: float) -> int:
    return int(round(cfg.num_layers - p * (cfg.num_layers - cfg.min_layer)))


def icd_layers(cfg: ScheduleConfig) -> tuple[int, ...]:
    """ICD's compression layer of each stage, deep to shallow: cfg.icd_layers when given (their number is the number
    of stages; icd_stages is then unused), else icd_stages evenly spaced layers ending at min_layer. Raises
    ValueError when they are not strictly decreasing inside [0, L - 1]."""
    stages = cfg.icd_stages
    layers = cfg.icd_layers or tuple(int(round(cfg.num_layers - (s + 1) / stages * (cfg.num_layers - cfg.min_layer)))
                                     for s in range(stages))
    if any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < cfg.num_layers for v in layers) or any(
            a <= b for a, b in zip(layers, layers[1:])):
        raise ValueError(f"schedule icd_layers must be strictly decreasing (deep to shallow) ints in "
                         f"[0, {cfg.num_layers - 1}], got {list(layers)}"
                         + ("" if cfg.icd_layers else f" from icd_stages={stages}, min_layer={cfg.min_layer}: use "
                                                        "fewer stages or give icd_layers"))
    return layers


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
    if cfg.kind == "icd":
        layers = icd_layers(cfg)
        stages = len(layers)
        stage = min(step * stages // total_steps, stages - 1)  # integer arithmetic: exact stage boundaries
        local = (step * stages - stage * total_steps) / total_steps  # progress inside the stage, 0 -> 1
        student = _tcd_ratio(cfg, local, rng)
        teacher = _clamp_ratio(max(student - _gap(cfg, local), 0.0))
        return CompressionStep(p, student, layers[stage], teacher, layers[stage])
    if cfg.kind == "tcd+lcd":
        student = _tcd_ratio(cfg, p, rng)
        layer = _lcd_layer(cfg, p)
        return CompressionStep(p, student, layer, _clamp_ratio(max(student - gap, 0.0)), layer)
    teacher = cfg.teacher_ratio if cfg.teacher_ratio is not None else max(cfg.target_ratio - gap, 0.0)
    return CompressionStep(p, cfg.target_ratio, cfg.layer, _clamp_ratio(teacher), cfg.layer)


# Fields a constants spec may set: the TCD constants and the progression knobs (the command line owns the rest).
CONSTANT_FIELDS = ("ratio_min_start", "ratio_min_slope", "ratio_max_start", "ratio_max_slope", "gap_start",
                   "gap_slope", "gap_max", "progressive_ratio", "icd_stages", "icd_layers")


@dataclass(frozen=True)
class ResolvedConstants:
    """A constants spec made concrete: the preset it started from, the ScheduleConfig fields it sets, and the
    distillation weight and temperature of the preset (for the method)."""

    preset: str
    schedule: dict
    lam: float
    tau: float

    def describe(self) -> str:
        return f"preset {self.preset}: " + json.dumps(self.schedule | {"lam": self.lam, "tau": self.tau},
                                                     sort_keys=True)


def resolve_constants(spec: str | dict | None, method: str = "fastv") -> ResolvedConstants:
    """Resolves `--schedule-constants`: a preset name ("paper", "release"), or a JSON object (string or dict)
    whose optional "preset" key names the base (default DEFAULT_PRESET) and whose other keys override
    CONSTANT_FIELDS. None or "" means the default preset.

    Raises:
        ValueError: unknown preset, bad JSON, keys outside CONSTANT_FIELDS.
    """
    if spec is None or spec == "":
        spec = {}
    if isinstance(spec, str):
        if spec in CONSTANT_PRESETS:
            spec = {"preset": spec}
        else:
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"expected {' or '.join(CONSTANT_PRESETS)} or a JSON object, got {spec!r} "
                                 f"({exc})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"expected a preset name or a JSON object, got {spec!r}")
    overrides = dict(spec)
    preset = overrides.pop("preset", DEFAULT_PRESET)
    if preset not in CONSTANT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(CONSTANT_PRESETS)}")
    unknown = set(overrides) - set(CONSTANT_FIELDS)
    if unknown:
        raise ValueError(f"unknown or command-line-owned keys {sorted(unknown)}; allowed: "
                         f"{sorted(CONSTANT_FIELDS)} and 'preset'")
    base = CONSTANT_PRESETS[preset]
    lam = base["lam_random"] if method == "random" else base["lam"]
    return ResolvedConstants(preset, base["schedule"] | overrides, lam, base["tau"])
