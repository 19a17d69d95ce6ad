"""`python -m epic_ext.train` refuses user errors before DeepSpeed starts and the model loads: one line on stderr,
a non-zero exit, no traceback; --help shows the defaults."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
from helpers.train_assets import make_train_assets

pytest.importorskip("transformers")

from epic_ext.train.__main__ import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("train_cli"))


def base_args(assets, out_dir) -> list[str]:
    return ["--model", assets["model"], "--data", assets["data"], "--image-folder", assets["images"],
            "--output-dir", str(out_dir), "--layer", "1", "--min-layer", "1", "--max-steps", "2"]


def refused(capsys, argv) -> str:
    """Runs main(argv), asserts a one-line error and a non-zero status; returns the line."""
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def test_missing_model_directory(assets, tmp_path, capsys):
    line = refused(capsys, with_option(base_args(assets, tmp_path), "--model", str(tmp_path / "no-such-model")))
    assert "--model" in line and "does not exist" in line
    assert "Repo id" not in line


def test_model_directory_without_config(assets, tmp_path, capsys):
    line = refused(capsys, with_option(base_args(assets, tmp_path), "--model", str(tmp_path)))
    assert "--model" in line and "config.json" in line


def test_missing_data_file(assets, tmp_path, capsys):
    line = refused(capsys, with_option(base_args(assets, tmp_path), "--data", str(tmp_path / "missing.jsonl")))
    assert line.startswith("error: --data") and "does not exist" in line


def test_malformed_jsonl_line_is_one_line(assets, tmp_path, capsys):
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([good] * 8 + ["{not json"]) + "\n")
    line = refused(capsys, with_option(base_args(assets, tmp_path / "out"), "--data", str(data)))
    assert "--data" in line and "line 9: invalid JSON" in line


@pytest.mark.parametrize("option, value, match", [
    ("--layer", "2", "--layer must be in [0, 1]"),  # the tiny model has 2 decoder layers
    ("--min-layer", "2", "--min-layer must be in [0, 1]"),
])
def test_layers_checked_against_the_models_config(assets, tmp_path, capsys, option, value, match):
    argv = with_option(base_args(assets, tmp_path), option, value) + ["--schedule", "lcd"]
    line = refused(capsys, argv)
    assert match in line and "2 decoder layers" in line
    assert not (tmp_path / "train_config.json").exists()  # nothing started


def test_icd_stages_that_do_not_fit_the_model_stop_before_start_up(assets, tmp_path, capsys):
    """ICD's 3 default stages need 3 distinct layers from the deepest down to --min-layer: a 2-layer model has 2."""
    argv = with_option(base_args(assets, tmp_path), "--layer", "0") + ["--schedule", "icd", "--min-layer", "0"]
    line = refused(capsys, argv)
    assert "--schedule icd" in line and "2 decoder layers" in line and "icd_layers" in line
    assert not (tmp_path / "train_config.json").exists()


def test_eval_keep_checked_against_the_visual_tokens(assets, tmp_path, capsys):
    line = refused(capsys, base_args(assets, tmp_path) + ["--eval-data", assets["test"], "--eval-keep", "17"])
    assert "--eval-keep" in line and "16 visual tokens" in line


@pytest.mark.parametrize("argv, match", [
    (["--model", "m", "--data", "d.json", "--log-steps", "0"], "--log-steps must be >= 1"),
    (["--model", "m", "--data", "d.json", "--max-skip-fraction", "1.5"], "--max-skip-fraction must be in [0, 1]"),
    (["--model", "m", "--data", "d.json", "--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1]"),
    (["--model", "m", "--data", "d.json", "--eval-keep", "0"], "--eval-keep values must be >= 1"),
])
def test_bad_settings(capsys, argv, match):
    assert match in refused(capsys, argv)


def test_missing_image_folder_stops_before_start_up(assets, tmp_path, capsys):
    started = time.perf_counter()
    line = refused(capsys, with_option(base_args(assets, tmp_path), "--image-folder", str(tmp_path / "nonexistent")))
    assert "96 of 96 training records skipped (missing_image: 96)" in line
    assert "--max-skip-fraction 0.01" in line and "--image-folder" in line and "does not exist" in line
    assert not (tmp_path / "train_config.json").exists() and time.perf_counter() - started < 30


def test_skip_fraction_allows_a_few_bad_records(assets, tmp_path, capsys):
    records = json.loads(pathlib.Path(assets["data"]).read_text())
    records[0]["image"] = "images/missing.png"
    data = tmp_path / "some_missing.json"
    data.write_text(json.dumps(records))
    argv = with_option(base_args(assets, tmp_path / "out"), "--data", str(data))
    line = refused(capsys, argv)  # 1 of 96 > 1%
    assert "1 of 96 training records skipped (missing_image: 1)" in line
    from epic_ext.train.preflight import preflight
    from epic_ext.train.config import parse_args

    run = preflight(parse_args(argv + ["--max-skip-fraction", "0.02"]))
    assert len(run.records) == 96 and run.num_layers == 2


def test_on_bad_image_error_names_the_file(assets, tmp_path, capsys):
    argv = with_option(base_args(assets, tmp_path), "--image-folder", str(tmp_path)) + ["--on-bad-image", "error"]
    line = refused(capsys, argv)
    assert "--on-bad-image error" in line and "train_000000.png" in line and "is missing" in line


def fake_checkpoint(out_dir: pathlib.Path, argv: list[str], world_size: int) -> pathlib.Path:
    """A complete checkpoint directory as the loop writes it (its completion marker listing its files), without
    DeepSpeed's files (the check runs before them)."""
    from epic_ext.train.checkpoint import MARKER, RUN_FILE
    from epic_ext.train.config import parse_args
    from epic_ext.train.preflight import preflight

    config = preflight(parse_args(argv)).cfg.to_json()  # the loop records the resolved run (--lam / --tau)
    step = out_dir / "checkpoints" / "step0000002"
    step.mkdir(parents=True)
    (out_dir / "checkpoints" / "latest").write_text(step.name)
    (step / RUN_FILE).write_text(json.dumps({"step": 2, "world_size": world_size, "zero_stage": 2,
                                             "config": json.loads(config), "marker": MARKER}))
    files = {p.name: p.stat().st_size for p in step.iterdir()}
    (step / MARKER).write_text(json.dumps({"step": 2, "world_size": world_size, "files": files}))
    return step


def test_resume_with_another_world_size_is_refused(assets, tmp_path, capsys):
    argv = base_args(assets, tmp_path)
    fake_checkpoint(tmp_path, argv, 2)
    line = refused(capsys, argv + ["--resume", "auto"])
    assert "--resume" in line and "written by 2 processes, this run has 1" in line


def test_resume_of_a_missing_checkpoint(assets, tmp_path, capsys):
    line = refused(capsys, base_args(assets, tmp_path) + ["--resume", str(tmp_path / "nothing")])
    assert line.startswith("error: --resume: no checkpoint under")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--data", "d.json", "--zero", "two"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--zero" in err


def test_user_error_in_a_subprocess_has_no_traceback(assets, tmp_path):
    """As users run it: the missing --model of the issue, a message and exit status 2 in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    argv = with_option(base_args(assets, tmp_path), "--model", "/nonexistent/llava")
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", *argv], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --model: /nonexistent/llava does not exist (expected a llava-hf checkpoint directory)"]


def _help_defaults(module: str) -> tuple[str, list[str]]:
    """--help of a CLI, and the options whose non-None, non-suppressed default it does not show."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from epic_ext.demo.__main__ import build_parser as demo_parser
    from epic_ext.efficiency import _parser as efficiency_parser
    from epic_ext.eval import build_parser as eval_parser
    from epic_ext.train.config import build_parser as train_parser

    build_parser = {"epic_ext.train": train_parser, "epic_ext.eval": eval_parser,
                    "epic_ext.efficiency": efficiency_parser, "epic_ext.demo": demo_parser}[module]
    blocks = re.split(r"\n  (?=-)", proc.stdout)
    missing = []
    for action in build_parser()._actions:
        if (action.default in (None, argparse.SUPPRESS) or action.help in (None, argparse.SUPPRESS)
                or action.required or not action.option_strings):
            continue
        block = next((b for b in blocks if b.startswith(action.option_strings[0])), "")
        if "default" not in " ".join(block.split()):
            missing.append(action.option_strings[0])
    return proc.stdout, missing


def test_train_help_shows_defaults():
    text, missing = _help_defaults("epic_ext.train")
    assert missing == []
    assert "--max-skip-fraction" in text and "(default: 0.01)" in " ".join(text.split())


def test_eval_help_shows_defaults_and_a_complete_description():
    text, missing = _help_defaults("epic_ext.eval")
    assert missing == []
    description = " ".join(text.split("\n\n")[1].split())
    assert description.startswith("Measures the exact-match accuracy") and description.endswith(".")
    assert not description.endswith("at several")


def test_efficiency_help_shows_defaults():
    assert _help_defaults("epic_ext.efficiency")[1] == []


def test_demo_help_shows_defaults():
    assert _help_defaults("epic_ext.demo")[1] == []


def test_resume_may_extend_the_run_but_not_change_the_optimizer(assets, tmp_path, capsys, caplog):
    from epic_ext.train.config import parse_args
    from epic_ext.train.preflight import preflight

    argv = base_args(assets, tmp_path)
    fake_checkpoint(tmp_path, argv, world_size=1)
    longer = with_option(argv, "--max-steps", "4") + ["--resume", "auto", "--save-steps", "5"]
    preflight(parse_args(longer))  # the resume check of the resolved run
    assert "the run's length changed (--max-steps 2 -> 4)" in caplog.text
    line = refused(capsys, longer + ["--lr", "1e-3", "--seed", "5"])
    assert "--lr 0.001 (checkpoint: 2e-05); --seed 5 (checkpoint: 0)" in line
