"""`python -m epic_ext.train` as users launch it, from the tests: a subprocess (one process, or torchrun for several)
on the tiny assets of helpers.train_assets / helpers.chat_assets, and what its output directory holds."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

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
