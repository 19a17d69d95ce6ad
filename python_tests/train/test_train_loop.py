"""`python -m epic_ext.train` end to end with DeepSpeed on CPU (gloo): ZeRO-2/3, two processes, exact resume,
export. Each run is a real subprocess, launched as users launch it."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from helpers.train_assets import make_train_assets
from helpers.train_runs import loss_decreases, losses, one_error_line, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("train"))


@pytest.mark.parametrize("zero", [0, 2, 3])  # under ZeRO 0 DeepSpeed reports no gradient norm: ours is logged
def test_loss_decreases(assets, tmp_path, zero):
    metrics = loss_decreases(assets, tmp_path, "--zero", str(zero))
    row = metrics[14]
    for key in ("sft_loss", "kd_loss", "student_ratio", "teacher_ratio", "student_layer", "lr", "grad_norm",
                "tokens_per_s", "peak_memory_mb"):
        assert row[key] is not None
    assert row["teacher_ratio"] <= row["student_ratio"]


def test_no_future_warning_from_our_calls(assets, tmp_path):
    """--gradient-checkpointing called transformers' deprecated gradient_checkpointing_enable (a FutureWarning on
    every run with transformers >= 5.23)."""
    proc = run_train(assets, tmp_path, "--zero", "2", "--max-steps", "2", "--gradient-checkpointing")
    ours = [line for line in proc.stderr.splitlines()
            if "FutureWarning" in line and ("epic_ext/train" in line or "epic_ext/eval" in line
                                            or "gradient_checkpointing" in line)]
    assert ours == []


def test_two_processes_match_one(assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(assets, one, "--zero", "2", "--max-steps", "3", "--grad-accum", "2")
    run_train(assets, two, "--zero", "2", "--max-steps", "3", "--grad-accum", "1", nproc=2)
    a, b = losses(one), losses(two)
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), step
        assert a[step]["student_ratio"] == b[step]["student_ratio"]


def tensorboard_steps(out_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pathlib.Path(out_dir) / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_resume_after_kill_matches_uninterrupted(assets, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("--zero", "2", "--max-steps", "6", "--save-steps", "3", "--schedule", "tcd+lcd")
    run_train(assets, full, *args)
    run_train(assets, cut, *args, "--stop-after-steps", "4")  # killed after step 4, its checkpoint is step 3
    assert sorted(losses(cut)) == [1, 2, 3, 4]
    run_train(assets, cut, *args, "--resume", "auto")
    a, b = losses(full), losses(cut)
    rows = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 7))  # step 4 once: the rows after the checkpoint were dropped on resume
    assert tensorboard_steps(cut) == list(range(1, 7))  # the killed run's step 4 is purged from the events
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["student_layer"] == a[step]["student_layer"]


@pytest.fixture(scope="module")
def checkpointed(assets, tmp_path_factory):
    """A 2-step ZeRO-2 run with a checkpoint at step 2, and its command line."""
    out = tmp_path_factory.mktemp("checkpointed")
    args = ["--zero", "2", "--max-steps", "4", "--save-steps", "2", "--stop-after-steps", "2"]
    run_train(assets, out, *args)
    return out, args


def test_resume_with_other_settings_is_refused(assets, checkpointed):
    out, args = checkpointed
    saved = (out / "train_config.json").read_text()
    line = one_error_line(run_train(assets, out, *args, "--resume", "auto", "--method", "dart",
                                    "--micro-batch-size", "2", check=False))
    assert "--resume" in line and "step0000002 was written with other settings" in line
    assert "--method 'dart' (checkpoint: 'fastv')" in line and "--micro-batch-size 2 (checkpoint: 4)" in line
    assert (out / "train_config.json").read_text() == saved


def test_resume_with_another_zero_stage_is_refused(assets, checkpointed):
    out, args = checkpointed
    line = one_error_line(run_train(assets, out, *with_zero(args, "3"), "--resume", "auto", check=False))
    assert "ZeRO stage 2, this run uses stage 3" in line and "--zero 2" in line
    assert "NoneType" not in line


def with_zero(args, stage):
    args = list(args)
    args[args.index("--zero") + 1] = stage
    return args


def test_resume_may_change_logging_and_saving(assets, checkpointed, tmp_path):
    out, args = checkpointed
    copy = tmp_path / "copy"  # the output directory may change too
    shutil.copytree(out, copy)
    run_train(assets, copy, *args[:-2], "--resume", "auto", "--log-steps", "2", "--keep-checkpoints", "1")
    assert sorted(losses(copy)) == [1, 2, 4]
    assert json.loads((copy / "train_config.json").read_text())["log_steps"] == 2


def with_corrupt_images(assets, tmp_path, count):
    """The assets with a copy of the image folder whose first `count` training images do not decode."""
    images = tmp_path / "images"
    shutil.copytree(pathlib.Path(assets["images"]), images)
    for path in sorted((images / "images").glob("train_*.png"))[:count]:
        path.write_bytes(b"not a png")
    return {**assets, "images": str(images)}


def test_too_many_skipped_samples_stop_the_run_at_the_end(assets, tmp_path):
    """Undecodable images pass the early scan (the files exist); the share of skipped samples seen is checked
    when training ends, before the export."""
    proc = run_train(with_corrupt_images(assets, tmp_path, 30), tmp_path / "out", "--zero", "2", "--max-steps", "4",
                     "--export", check=False)
    line = one_error_line(proc)
    assert re.search(r"error: \d+ of \d+ training samples skipped \(corrupt_image: \d+\), more than "
                     r"--max-skip-fraction 0.01", line), line
    assert not (tmp_path / "out" / "final").exists()


def test_no_usable_sample_stops_instead_of_looping(assets, tmp_path):
    proc = run_train(with_corrupt_images(assets, tmp_path, 96), tmp_path / "out", "--zero", "2", "--max-steps", "2",
                     "--max-skip-fraction", "1", check=False)
    line = one_error_line(proc)
    assert "every sample this process drew was skipped (corrupt_image: 96)" in line


def test_export_loads_back_and_generates(assets, tmp_path):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic_ext.eval import evaluate, load_items
    from epic_ext.data import load_records

    proc = run_train(assets, tmp_path, "--zero", "3", "--max-steps", "2", "--export")
    assert "exported to" in proc.stdout
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "final"))
    processor = AutoProcessor.from_pretrained(str(tmp_path / "final"))
    assert not any(torch.isnan(p).any() for p in model.parameters())
    items = load_items(load_records(assets["test"])[:4], assets["images"])
    rows = evaluate(model, processor, items, [{"method": "fastv", "keep": 16}, {"method": "fastv", "keep": 4,
                                                                                "layer": 1}], max_new_tokens=2)
    assert [r["keep"] for r in rows] == [16, 4]
    assert all(len(r["predictions"]) == 4 for r in rows)


def test_bad_arguments_exit_with_a_message(assets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", "--data", assets["data"]], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--model and --data are required" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", "--model", assets["model"], "--data", assets["data"],
                           "--method", "nope"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--method must be one of" in proc.stderr


def test_icd_with_the_paper_preset(assets, tmp_path):
    """--schedule icd through the CLI: two stages (layers 1 then 0), the paper's TCD range restarting at the layer
    change, the preset's lambda when --lam is not given, and the resolved constants logged at start."""
    proc = run_train(assets, tmp_path, "--zero", "0", "--max-steps", "6", "--schedule", "icd", "--min-layer", "0",
                     "--schedule-constants", '{"preset": "paper", "icd_stages": 2}')
    assert 'TCD constants preset paper: {"gap_max": 0.3' in proc.stderr and "lam 0.7, tau 1" in proc.stderr
    assert json.loads((tmp_path / "train_config.json").read_text())["lam"] == 0.7
    metrics = losses(tmp_path)
    assert [metrics[s]["student_layer"] for s in range(1, 7)] == [1, 1, 1, 0, 0, 0]
    assert metrics[1]["student_ratio"] <= 0.05 and metrics[4]["student_ratio"] <= 0.05  # each stage starts small
    # a stage's last step: local progress 2/3, so min(2/3) = 0.5 * 2/3
    assert metrics[3]["student_ratio"] >= 1 / 3 and metrics[6]["student_ratio"] >= 1 / 3
