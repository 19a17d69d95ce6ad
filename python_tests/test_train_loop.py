"""`python -m epic_ext.train` end to end with DeepSpeed on CPU (gloo): ZeRO-2/3, two processes, exact resume,
export. Each run is a real subprocess, launched as users launch it."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from train_assets import make_train_assets

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("train"))


def run_train(assets, out_dir, *extra, nproc=1, check=True):
    base = ["--model", assets["model"], "--data", assets["data"], "--image-folder", assets["images"],
            "--output-dir", str(out_dir), "--method", "fastv", "--layer", "1", "--min-layer", "1",
            "--micro-batch-size", "4", "--max-length", "128", "--lr", "3e-3", "--warmup-ratio", "0",
            "--no-freeze-vision", "--seed", "3", "--no-export", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    if nproc == 1:
        cmd = [sys.executable, "-m", "epic_ext.train", *base]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
    else:
        with socket.socket() as sock:  # torchrun's static rendezvous hangs with port 0: give it a free port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               "-m", "epic_ext.train", *base]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(out_dir):
    rows = [json.loads(line) for line in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.mark.parametrize("zero", [2, 3])
def test_loss_decreases(assets, tmp_path, zero):
    run_train(assets, tmp_path, "--zero", str(zero), "--max-steps", "14", "--schedule", "tcd", "--lam", "0.7")
    metrics = losses(tmp_path)
    assert sorted(metrics) == list(range(1, 15))
    first = sum(metrics[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["loss"] for s in (12, 13, 14)) / 3
    assert last < 0.9 * first, (first, last)
    row = metrics[14]
    for key in ("sft_loss", "kd_loss", "student_ratio", "teacher_ratio", "student_layer", "lr", "grad_norm",
                "tokens_per_s", "peak_memory_mb"):
        assert row[key] is not None
    assert row["teacher_ratio"] <= row["student_ratio"]


def test_two_processes_match_one(assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(assets, one, "--zero", "2", "--max-steps", "3", "--grad-accum", "2")
    run_train(assets, two, "--zero", "2", "--max-steps", "3", "--grad-accum", "1", nproc=2)
    a, b = losses(one), losses(two)
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), step
        assert a[step]["student_ratio"] == b[step]["student_ratio"]


def test_resume_after_kill_matches_uninterrupted(assets, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("--zero", "2", "--max-steps", "6", "--save-steps", "3", "--schedule", "tcd+lcd")
    run_train(assets, full, *args)
    run_train(assets, cut, *args, "--stop-after-steps", "3")
    assert sorted(losses(cut)) == [1, 2, 3]
    run_train(assets, cut, *args, "--resume", "auto")
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["student_layer"] == a[step]["student_layer"]


def test_export_loads_back_and_generates(assets, tmp_path):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic_ext.eval import evaluate, load_items
    from epic_ext.train.data import load_records

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
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--model and --data are required" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", "--demo", "--method", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--method must be one of" in proc.stderr
