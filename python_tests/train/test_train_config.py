"""Training configuration pieces: parameter groups and freezing, the learning-rate schedule, DeepSpeed configs,
command-line validation, answer normalisation of the evaluation."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from epic_ext.eval import normalize_answer  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava  # noqa: E402
from epic_ext.schedules import resolve_constants  # noqa: E402
from epic_ext.train.config import TrainConfig, deepspeed_config, parse_args  # noqa: E402
from epic_ext.train.loop import _lr_lambda, _param_groups  # noqa: E402


# what parse_args requires (its checks need no files: preflight checks them)
REQUIRED = ["--model", "model_dir", "--data", "data.json"]


def test_param_groups_learning_rates_and_freezing():
    model = build_tiny_llava()
    cfg = TrainConfig(lr=1e-4, vision_lr=1e-5, projector_lr=3e-4, weight_decay=0.1,
                      freeze_vision=False, freeze_projector=False, freeze_llm=False)
    groups = {g["name"]: g for g in _param_groups(model, cfg)}
    assert groups["vision"]["lr"] == 1e-5 and groups["projector"]["lr"] == 3e-4 and groups["llm"]["lr"] == 1e-4
    assert groups["llm"]["weight_decay"] == 0.1 and groups["llm_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in groups["llm_no_decay"]["params"])
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())

    frozen = TrainConfig(freeze_vision=True, freeze_projector=True)
    names = {g["name"] for g in _param_groups(model, frozen)}
    assert names == {"llm", "llm_no_decay"}
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    with pytest.raises(ValueError, match="nothing to train"):
        _param_groups(model, TrainConfig(freeze_vision=True, freeze_projector=True, freeze_llm=True))


def test_warmup_then_cosine():
    factor = _lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(100) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bundled_deepspeed_configs_fill_auto(zero):
    cfg = TrainConfig(zero=zero, micro_batch_size=3, grad_accum=5, max_grad_norm=0.5, bf16=True)
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == zero
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(ds)


def test_user_deepspeed_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 2.0,
                                "optimizer": {"type": "Adam"}}))
    ds = deepspeed_config(TrainConfig(deepspeed_config=str(path)), world_size=1)
    assert ds["gradient_clipping"] == 2.0 and "optimizer" not in ds
    with pytest.raises(FileNotFoundError, match="--deepspeed-config"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "missing.json")), 1)


@pytest.mark.parametrize("argv, match", [
    (["--model", "m"], "--model and --data are required"),
    ([*REQUIRED, "--zero", "4"], "--zero must be"),
    ([*REQUIRED, "--ratio", "1.0"], "--ratio must be in"),
    ([*REQUIRED, "--lam", "2"], "--lam must be in"),
    ([*REQUIRED, "--tau", "0"], "--tau must be > 0"),
    ([*REQUIRED, "--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    ([*REQUIRED, "--method", "fastvv"], "--method must be one of"),
    ([*REQUIRED, "--schedule-constants", '{"gap_maxx": 0.2}'], "--schedule-constants: unknown"),
    ([*REQUIRED, "--schedule-constants", '{"layer": 3}'], "--schedule-constants: unknown or command-line-owned"),
    ([*REQUIRED, "--schedule-constants", "papr"], "--schedule-constants: expected paper or release"),
    ([*REQUIRED, "--schedule-constants", '{"preset": "arxiv"}'], "--schedule-constants: unknown preset"),
])
def test_bad_command_lines(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_schedule_constants_reach_the_config():
    cfg = parse_args([*REQUIRED, "--schedule", "lcd", "--schedule-constants", '{"gap_max": 0.2}', "--local_rank", "3"])
    assert cfg.schedule == "lcd" and resolve_constants(cfg.schedule_constants).schedule["gap_max"] == 0.2


@pytest.mark.parametrize("argv, preset, lam", [
    ([], "release", 0.5),
    (["--method", "random"], "release", 0.4),
    (["--schedule-constants", "paper"], "paper", 0.7),
    (["--schedule-constants", "paper", "--method", "random"], "paper", 0.7),
    (["--schedule-constants", "release", "--lam", "0.3"], "release", 0.3),
    (["--schedule-constants", '{"preset": "paper", "progressive_ratio": false}'], "paper", 0.7),
])
def test_presets_give_lambda_unless_given(argv, preset, lam):
    cfg = parse_args([*REQUIRED, *argv])
    constants = resolve_constants(cfg.schedule_constants, cfg.method)
    assert constants.preset == preset
    assert cfg.resolved_lam(constants) == lam and cfg.resolved_tau(constants) == 1.0
    assert TrainConfig().schedule_constants == "release"


def test_answer_normalisation():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("Yes!") == normalize_answer("yes")
    assert normalize_answer("two circles") != normalize_answer("two")
