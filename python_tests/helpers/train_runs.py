"""`python -m epic_ext.train` as users launch it, from the tests: a subprocess (one process, or torchrun for several)
on the tiny assets of helpers.train_assets / helpers.chat_assets, and what its output directory holds."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
    # cwd outside the source tree: `-m` would otherwise import the sources instead of an installed package
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=pathlib.Path(out_dir).parent)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(out_dir):
    rows = [json.loads(line) for line in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def _checked_descent(out_dir, steps: int) -> dict:
    """Every step logged once, and the loss fell by more than 10% (mean of the last three steps against the first
    three)."""
    metrics = losses(out_dir)
    assert sorted(metrics) == list(range(1, steps + 1))
    first = sum(metrics[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["loss"] for s in (steps - 2, steps - 1, steps)) / 3
    assert last < 0.9 * first, (first, last)
    return metrics


def loss_decreases(assets, out_dir, *extra, steps: int = 14) -> dict:
    """Trains `steps` TCD steps (lambda 0.7; ZeRO-2 unless `extra` gives --zero) and checks the loss falls; returns
    the metrics by step."""
    zero = () if "--zero" in extra else ("--zero", "2")
    run_train(assets, out_dir, *zero, "--max-steps", str(steps), "--schedule", "tcd", "--lam", "0.7", *extra)
    return _checked_descent(out_dir, steps)


def resume_matches_uninterrupted(assets, tmp_path, *args, steps: int = 6, kill_after: int = 4) -> tuple[dict, dict]:
    """Runs `args` (which checkpoint every steps // 2 steps) once uninterrupted and once stopped after `kill_after`
    steps then resumed with --resume auto; checks every step's loss, student layer and ratio agree. Returns the
    metrics (uninterrupted, resumed) by step."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_train(assets, full, *args)
    run_train(assets, cut, *args, "--stop-after-steps", str(kill_after))
    assert sorted(losses(cut)) == list(range(1, kill_after + 1))
    run_train(assets, cut, *args, "--resume", "auto")
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-7), step
        assert b[step]["student_layer"] == a[step]["student_layer"]
        assert b[step]["student_ratio"] == a[step]["student_ratio"]
    return a, b
