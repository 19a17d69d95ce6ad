"""TCD / LCD / ICD / TCD+LCD / fixed schedules and the TCD constant presets: formulas at t = 0, mid, end and at
ICD's stage boundaries; reproducibility under a seed and resume."""

from __future__ import annotations

import random

import pytest

from epic_ext.schedules import CONSTANT_PRESETS, ScheduleConfig, compression_at, icd_layers, resolve_constants


def gap(p):
    return min(0.1 + 0.5 * p, 0.3)


@pytest.mark.parametrize("step", [0, 500, 1000])
def test_tcd_formulas(step):
    cfg = ScheduleConfig(kind="tcd", num_layers=32, layer=2, seed=3)
    p = step / 1000
    draws = [compression_at(step, 1000, ScheduleConfig(kind="tcd", num_layers=32, layer=2, seed=s))
             for s in range(300)]
    low, high = 0.1 + 0.16 * p, 0.1 + 0.64 * p
    for d in draws:
        assert low - 1e-12 <= d.student_ratio <= high + 1e-12
        assert d.teacher_ratio == pytest.approx(max(d.student_ratio - gap(p), 0.0))
        assert d.student_layer == d.teacher_layer == 2
    if step > 0:  # the draws cover the range
        ratios = [d.student_ratio for d in draws]
        assert min(ratios) < low + 0.1 * (high - low) and max(ratios) > high - 0.1 * (high - low)
    one = compression_at(step, 1000, cfg)
    assert one.progress == p


def test_tcd_end_values():
    d = compression_at(1000, 1000, ScheduleConfig(kind="tcd", seed=1))
    assert 0.26 <= d.student_ratio <= 0.74
    assert d.teacher_ratio == pytest.approx(d.student_ratio - 0.3)


@pytest.mark.parametrize("step, layer", [(0, 32), (500, 17), (1000, 2)])
def test_lcd_layer_moves_deep_to_shallow(step, layer):
    cfg = ScheduleConfig(kind="lcd", num_layers=32, min_layer=2, target_ratio=0.778)
    d = compression_at(step, 1000, cfg)
    assert d.student_layer == d.teacher_layer == layer == round(32 - step / 1000 * 30)
    assert d.student_ratio == 0.778
    assert d.teacher_ratio == pytest.approx(0.778 - gap(step / 1000))


def test_tcd_plus_lcd_moves_both():
    cfg = ScheduleConfig(kind="tcd+lcd", num_layers=16, min_layer=1, seed=5)
    first, last = compression_at(0, 100, cfg), compression_at(100, 100, cfg)
    assert first.student_layer == 16 and last.student_layer == 1
    assert first.student_ratio == pytest.approx(0.1)
    assert 0.26 <= last.student_ratio <= 0.74


def test_fixed():
    cfg = ScheduleConfig(kind="fixed", layer=3, target_ratio=0.75, teacher_ratio=0.0)
    for step in (0, 7, 100):
        d = compression_at(step, 100, cfg)
        assert (d.student_ratio, d.student_layer, d.teacher_ratio, d.teacher_layer) == (0.75, 3, 0.0, 3)
    gapped = compression_at(100, 100, ScheduleConfig(kind="fixed", target_ratio=0.75, teacher_ratio=None))
    assert gapped.teacher_ratio == pytest.approx(0.45)


def test_reproducible_and_resume_safe():
    cfg = ScheduleConfig(kind="tcd+lcd", num_layers=12, min_layer=2, seed=11)
    run = [compression_at(t, 50, cfg) for t in range(51)]
    random.seed(0)  # global random state must not matter
    resumed = [compression_at(t, 50, cfg) for t in range(20, 51)]
    assert run[20:] == resumed
    other_seed = [compression_at(t, 50, ScheduleConfig(kind="tcd+lcd", num_layers=12, min_layer=2, seed=12))
                  for t in range(51)]
    assert run != other_seed


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="cosine"), "kind must be one of"),
    (dict(layer=40), "layer must be in"),
    (dict(target_ratio=1.0), "target_ratio must be in"),
    (dict(min_layer=-1), "min_layer must be in"),
    (dict(teacher_ratio=1.5), "teacher_ratio must be in"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_bad_step():
    with pytest.raises(ValueError, match="step must be in"):
        compression_at(11, 10, ScheduleConfig())
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        compression_at(0, 0, ScheduleConfig())


# ------------------------------------------------------------------------------------------ presets and ICD --
# (p, min, max, gap) read off each preset's definition: release = the authors' code, paper = the paper's text
PRESET_POINTS = {
    "release": [(0.0, 0.1, 0.1, 0.1), (0.5, 0.18, 0.42, 0.3), (1.0, 0.26, 0.74, 0.3)],
    "paper": [(0.0, 0.0, 0.05, 0.05), (0.5, 0.25, 0.475, 0.175), (1.0, 0.5, 0.9, 0.3)],
}


def draws(cfg_kwargs, step, total, seeds=200):
    return [compression_at(step, total, ScheduleConfig(**cfg_kwargs, seed=s)) for s in range(seeds)]


def assert_tcd_range(steps, low, high, gap):
    for d in steps:
        assert low - 1e-12 <= d.student_ratio <= high + 1e-12
        assert d.teacher_ratio == pytest.approx(max(d.student_ratio - gap, 0.0))
    if high - low > 0.01:  # the draws cover the range
        ratios = [d.student_ratio for d in steps]
        assert min(ratios) < low + 0.1 * (high - low) and max(ratios) > high - 0.1 * (high - low)


@pytest.mark.parametrize("preset", sorted(PRESET_POINTS))
def test_tcd_presets_at_start_middle_end(preset):
    constants = resolve_constants(preset)
    assert constants.preset == preset
    for p, low, high, gap in PRESET_POINTS[preset]:
        steps = draws(dict(kind="tcd", layer=2, **constants.schedule), int(p * 1000), 1000)
        assert_tcd_range(steps, low, high, gap)
        assert all(d.student_layer == d.teacher_layer == 2 for d in steps)


def test_preset_distillation_weights_and_overrides():
    assert (resolve_constants("release", "fastv").lam, resolve_constants("release", "random").lam) == (0.5, 0.4)
    assert (resolve_constants("paper", "fastv").lam, resolve_constants("paper", "random").lam) == (0.7, 0.7)
    assert resolve_constants(None).preset == resolve_constants("{}").preset == "release"
    merged = resolve_constants('{"preset": "paper", "gap_max": 0.2, "icd_layers": [9, 5]}')
    assert merged.schedule == CONSTANT_PRESETS["paper"]["schedule"] | {"gap_max": 0.2, "icd_layers": [9, 5]}
    assert '"gap_max": 0.2' in merged.describe() and "preset paper" in merged.describe()
    assert resolve_constants({"preset": "release"}).schedule == CONSTANT_PRESETS["release"]["schedule"]
    for bad, match in [("papr", "expected paper or release"), ('{"preset": "x"}', "unknown preset"),
                       ('{"seed": 3}', "command-line-owned"), ("[1]", "JSON object")]:
        with pytest.raises(ValueError, match=match):
            resolve_constants(bad)


def test_release_defaults_are_the_dataclass_defaults():
    defaults = ScheduleConfig()
    assert all(getattr(defaults, k) == v for k, v in CONSTANT_PRESETS["release"]["schedule"].items())


@pytest.mark.parametrize("preset", sorted(PRESET_POINTS))
def test_without_progressive_ratio_samples_the_final_range_from_the_start(preset):
    """The paper's "w/o progressive compression ratio": the final range from step 0; the gap still grows."""
    constants = resolve_constants({"preset": preset, "progressive_ratio": False})
    _, low, high, _ = PRESET_POINTS[preset][-1]
    for p, _, _, gap in PRESET_POINTS[preset]:
        assert_tcd_range(draws(dict(kind="tcd", **constants.schedule), int(p * 1000), 1000), low, high, gap)


@pytest.mark.parametrize("num_layers, min_layer, stages, layers", [
    (32, 2, 3, (22, 12, 2)), (32, 2, 1, (2,)), (32, 0, 4, (24, 16, 8, 0)), (4, 0, 3, (3, 1, 0)), (2, 0, 2, (1, 0)),
])
def test_icd_default_layers(num_layers, min_layer, stages, layers):
    cfg = ScheduleConfig(kind="icd", num_layers=num_layers, min_layer=min_layer, layer=0, icd_stages=stages)
    assert icd_layers(cfg) == layers


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=2, min_layer=0, icd_stages=3), "use fewer stages or give icd_layers"),
    (dict(icd_layers=[4, 8]), "strictly decreasing"),
    (dict(icd_layers=[40, 8], icd_stages=2), "strictly decreasing"),
    (dict(icd_stages=0), "icd_stages must be an int >= 1"),
])
def test_icd_bad_layers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(kind="icd", layer=0, **kwargs)


@pytest.mark.parametrize("preset", sorted(PRESET_POINTS))
def test_icd_stages_restart_the_ratio_at_each_layer_change(preset):
    """T = 120, 3 stages at layers 22, 12, 2: stage boundaries at steps 40 and 80; inside each stage the TCD
    progression runs on the stage's own progress (0 at its first step), so p = 0.5 (step 60) is the middle of
    stage 2, and p = 1 (step 120) the end of the last stage."""
    constants = resolve_constants(preset).schedule
    start, middle, end = PRESET_POINTS[preset]
    kwargs = dict(kind="icd", num_layers=32, min_layer=2, layer=2, **constants)
    q = 39 / 40  # local progress of a stage's last step: min and max are linear, the gap is capped
    last_of_stage = (q, start[1] + (end[1] - start[1]) * q, start[2] + (end[2] - start[2]) * q,
                     min(constants["gap_start"] + constants["gap_slope"] * q, constants["gap_max"]))
    expected = [(0, 22, start), (39, 22, last_of_stage), (40, 12, start), (60, 12, middle), (79, 12, last_of_stage),
                (80, 2, start), (120, 2, end)]
    for step, layer, (_, low, high, gap) in expected:
        steps = draws(kwargs, step, 120)
        assert all(d.student_layer == d.teacher_layer == layer for d in steps), step
        assert steps[0].progress == step / 120
        assert_tcd_range(steps, low, high, gap)
    layers = [compression_at(t, 120, ScheduleConfig(**kwargs)).student_layer for t in range(121)]
    assert layers == [22] * 40 + [12] * 40 + [2] * 41


def test_icd_explicit_layers_and_progressive_ratio_off():
    cfg = ScheduleConfig(kind="icd", num_layers=16, layer=0, icd_layers=[10, 3],
                         progressive_ratio=False, seed=4)
    first, second = compression_at(0, 10, cfg), compression_at(5, 10, cfg)
    assert (first.student_layer, second.student_layer) == (10, 3)
    assert 0.26 <= first.student_ratio <= 0.74 and first.teacher_ratio == pytest.approx(first.student_ratio - 0.1)


@pytest.mark.parametrize("kind", ["icd", "tcd", "tcd+lcd"])
def test_resume_reproduces_the_draws(kind):
    """Draws are pure functions of (seed, step): a run resumed at step 37 sees exactly the uninterrupted values,
    whatever the global random state."""
    cfg = ScheduleConfig(kind=kind, num_layers=12, min_layer=1, layer=1, seed=21, **resolve_constants("paper").schedule)
    run = [compression_at(t, 90, cfg) for t in range(91)]
    random.seed(123)
    _ = [random.random() for _ in range(5)]
    resumed = [compression_at(t, 90, ScheduleConfig(**cfg.__dict__)) for t in range(37, 91)]
    assert run[37:] == resumed
    assert len({d.student_ratio for d in run}) > 80  # real draws, not a constant
