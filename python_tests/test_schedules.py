"""TCD / LCD / TCD+LCD / fixed schedules: formulas at t = 0, mid, end; reproducibility under a seed and resume."""

from __future__ import annotations

import random

import pytest

from epic_ext.schedules import ScheduleConfig, compression_at


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
