"""`python -m epic_ext.train --attn-implementation`: the language model runs the chosen attention (eager and SDPA
train to the same losses), flash_attention_2 without flash-attn is one line before any model loads, and the choice
may change on resume."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from helpers.train_assets import make_train_assets
from helpers.train_runs import losses, run_train

pytest.importorskip("transformers")

from epic_ext.models.families import Family  # noqa: E402
from epic_ext.train.__main__ import main  # noqa: E402

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("attn_option"))


def base_args(assets, out_dir) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"], "--image-folder", assets["images"],
            "--output-dir", str(out_dir), "--layer", "1", "--min-layer", "1", "--max-steps", "2"]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Family, "load_model", refuse)


def refused(capsys, argv) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here")
def test_flash_without_flash_attn_is_one_line_before_the_model_loads(assets, tmp_path, capsys, no_model_load):
    line = refused(capsys, base_args(assets, tmp_path) + ["--attn-implementation", "flash_attention_2"])
    assert line.startswith("error: --attn-implementation flash_attention_2 needs the flash-attn package"), line
    assert not (tmp_path / "train_config.json").exists()


def test_flash_on_a_machine_without_cuda_is_one_line(assets, tmp_path, capsys, no_model_load, monkeypatch):
    """With flash-attn importable (a stand-in module) but no GPU, the device is the problem named."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(capsys, base_args(assets, tmp_path) + ["--attn-implementation", "flash_attention_2"])
    assert line == "error: --attn-implementation flash_attention_2 runs on CUDA devices only, not cpu", line


def test_flash_without_bf16_is_one_line(assets, tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line = refused(capsys, base_args(assets, tmp_path) + ["--attn-implementation", "flash_attention_2"])
    assert line == ("error: --attn-implementation flash_attention_2 runs in float16 or bfloat16 only, not float32: "
                    "give --bf16"), line


def test_unknown_attention_is_an_argparse_error(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(base_args(assets, tmp_path) + ["--attn-implementation", "flex"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--attn-implementation" in err, err


def test_eager_and_sdpa_train_to_the_same_losses(assets, tmp_path):
    """Three optimizer steps of TCD distillation (student and teacher compressed, fp32): the same losses with either
    attention, and the loaded model's language model ran the one asked for (the loop logs it from the model)."""
    runs = {}
    for attn in ("eager", "sdpa"):
        out = tmp_path / attn
        proc = run_train(assets, out, "--max-steps", "3", "--attn-implementation", attn)
        assert f"language model attention: {attn}" in proc.stderr, proc.stderr[-3000:]
        runs[attn] = losses(out)
    assert sorted(runs["eager"]) == sorted(runs["sdpa"]) == [1, 2, 3]
    for step in runs["eager"]:
        for key in ("loss", "sft_loss", "kd_loss"):
            eager, sdpa = runs["eager"][step][key], runs["sdpa"][step][key]
            assert abs(eager - sdpa) <= 1e-5 * max(1.0, abs(sdpa)), (step, key, eager, sdpa)
    assert runs["eager"][3]["loss"] != runs["eager"][1]["loss"], "the run trained"


def test_load_model_sets_the_language_models_attention_only(assets):
    from epic_ext.models import _hf  # noqa: PLC0415
    from epic_ext.models.families import family_of_checkpoint  # noqa: PLC0415

    family = family_of_checkpoint(assets["model"])
    for attn in ("eager", "sdpa"):
        model = family.load_model(assets["model"], torch.float32, attn_implementation=attn)
        assert _hf.text_attention_implementation(model.model.language_model.config) == attn
        assert model.config.vision_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation must be one of eager, sdpa, flash_attention_2"):
        family.load_model(assets["model"], torch.float32, attn_implementation="flex_attention")
