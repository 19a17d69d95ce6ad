"""`kill -9` at any moment never strands a run: killed in start-up (holding DeepSpeed's build lock), training,
checkpoint writing, checkpoint rotation and export, the same command with `--resume auto` goes on, and the run ends
as an uninterrupted one: every step's metrics once, the same losses, bit-identical exported weights.

The kills come from EPIC_EXT_KILL_AT (epic_ext.train.faults): the process SIGKILLs itself at a named point. Each
run is a real `python -m epic_ext.train` subprocess on the tiny model, DeepSpeed ZeRO-2 on CPU (about 6 s each)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
from helpers.train_assets import make_train_assets

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = 6
COMMAND = ("--zero", "2", "--max-steps", str(STEPS), "--save-steps", "1", "--keep-checkpoints", "2", "--export",
           "--resume", "auto")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def extensions(tmp_path):
    """A private copy of the torch extensions folder (DeepSpeed's compiled CPU comm op, when `make test` has built
    it already), so that the locks these tests leave behind touch no other test."""
    target = tmp_path / "torch_extensions"
    shared = pathlib.Path(os.environ.get("TORCH_EXTENSIONS_DIR", ROOT / "build" / "torch_extensions"))
    if shared.is_dir():
        shutil.copytree(shared, target, ignore=shutil.ignore_patterns("lock"))
    else:
        target.mkdir()
    return target


def run_train(assets, out_dir, extensions, *extra, kill_at=None, timeout=240):
    args = ["--model", assets["model"], "--data", assets["data"], "--image-folder", assets["images"],
            "--output-dir", str(out_dir), "--method", "fastv", "--layer", "1", "--min-layer", "1",
            "--micro-batch-size", "4", "--max-length", "128", "--lr", "3e-3", "--warmup-ratio", "0",
            "--no-freeze-vision", "--seed", "3", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(extensions))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "EPIC_EXT_KILL_AT"):
        env.pop(key, None)
    if kill_at:
        env["EPIC_EXT_KILL_AT"] = kill_at
    # cwd outside the source tree: `-m` would otherwise import the sources instead of an installed package
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=pathlib.Path(out_dir).parent)
    expected = -signal.SIGKILL if kill_at else 0
    assert proc.returncode == expected, (kill_at, proc.stdout[-3000:] + proc.stderr[-6000:])
    return proc


def metric_steps(out_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def tensorboard_steps(out_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def checkpoint_dirs(out_dir) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.is_dir())


def exported_weights(out_dir) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted((out_dir / "final").glob("*.safetensors")):
        weights.update(load_file(str(path)))
    assert weights, f"no weights in {out_dir / 'final'}"
    return weights


def test_killed_anywhere_the_same_command_finishes_the_run_exactly(assets, tmp_path, extensions):
    from epic_ext.train.checkpoint import MARKER, incomplete

    reference, out = tmp_path / "reference", tmp_path / "killed"
    run_train(assets, reference, extensions, *COMMAND)
    ckpt = out / "checkpoints"

    # start-up: killed while holding DeepSpeed's build lock (torch's FileBaton, taken by every start)
    run_train(assets, out, extensions, *COMMAND, kill_at="build_lock")
    lock = extensions / "deepspeed_shm_comm" / "lock"
    assert lock.is_file()

    # training: killed after step 2's metrics row, before its checkpoint (the stale lock does not hang this run)
    proc = run_train(assets, out, extensions, *COMMAND, kill_at="train.step:2")
    assert f"removed the stale build lock {lock}" in proc.stderr
    assert checkpoint_dirs(out) == ["step0000001"] and metric_steps(out) == [1, 2]

    # checkpoint writing: DeepSpeed's files of step 3 written, ours not (the state the issue found)
    run_train(assets, out, extensions, *COMMAND, kill_at="checkpoint.deepspeed:2")
    assert checkpoint_dirs(out) == ["step0000001", "step0000002", "step0000003"]
    assert "epic_rank0.pt missing" in incomplete(ckpt / "step0000003")
    assert (ckpt / "latest").read_text() == "step0000002"  # DeepSpeed's `latest` only moves to a complete one

    # checkpoint writing: every file of step 3 written, the completion marker not
    proc = run_train(assets, out, extensions, *COMMAND, kill_at="checkpoint.files:1")
    assert (f"--resume auto: skipped the incomplete checkpoint {ckpt / 'step0000003'} (no {MARKER}, epic_run.json "
            "missing, epic_rank0.pt missing; the run was stopped while writing it): removed") in proc.stderr
    assert incomplete(ckpt / "step0000003") == f"no {MARKER}"

    # --resume naming an incomplete checkpoint: one line naming what it lacks, before DeepSpeed starts
    refused = subprocess.run(
        [sys.executable, "-m", "epic_ext.train", "--model", assets["model"], "--data", assets["data"],
         "--image-folder", assets["images"], "--output-dir", str(out), "--layer", "1", "--min-layer", "1",
         *COMMAND[:-1], str(ckpt / "step0000003")], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions)))
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert errors == [f"error: --resume: {ckpt / 'step0000003'} is incomplete (no {MARKER}; a run stopped while "
                      "writing a checkpoint leaves it so): resume from an earlier checkpoint, or --resume auto to "
                      "take the newest complete one"]

    # rotation: step 3 complete, step 1 moved aside for deletion and not yet deleted
    run_train(assets, out, extensions, *COMMAND, kill_at="checkpoint.rotate:1")
    assert checkpoint_dirs(out) == [".removing-step0000001." + d.name.rsplit(".", 1)[1]
                                    for d in ckpt.glob(".removing-step0000001.*")] + ["step0000002", "step0000003"]

    # export: the weights written into the staging folder, the processor and the move into place not
    run_train(assets, out, extensions, *COMMAND, kill_at="export.weights")
    assert checkpoint_dirs(out) == ["step0000005", "step0000006"]  # --keep-checkpoints 2, leftovers removed
    assert not (out / "final").exists() and (out / ".final.partial").is_dir()

    proc = run_train(assets, out, extensions, *COMMAND)
    assert f"exported to {out / 'final'}" in proc.stdout
    assert not (out / ".final.partial").exists() and not list(out.glob(".removing-*"))
    assert metric_steps(out) == list(range(1, STEPS + 1))  # each step once, in order
    assert losses(out) == losses(reference)  # bit for bit: every resume continued exactly
    assert tensorboard_steps(out) == list(range(1, STEPS + 1))
    final, expected = exported_weights(out), exported_weights(reference)
    assert sorted(final) == sorted(expected)
    different = [name for name in expected if not (final[name].dtype == expected[name].dtype
                                                     and final[name].equal(expected[name]))]
    assert different == []


def run_two(assets, out_dir, extensions, *extra, kill_at=None):
    """The same run in two processes (torchrun); with kill_at, rank 1 is killed there and torchrun stops rank 0."""
    import socket

    with socket.socket() as sock:  # torchrun's static rendezvous hangs with port 0: give it a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--model", assets["model"], "--data", assets["data"], "--image-folder", assets["images"],
            "--output-dir", str(out_dir), "--method", "fastv", "--layer", "1", "--min-layer", "1",
            "--micro-batch-size", "4", "--max-length", "128", "--lr", "3e-3", "--warmup-ratio", "0",
            "--no-freeze-vision", "--seed", "3", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(extensions))
    env.pop("EPIC_EXT_KILL_AT", None)
    if kill_at:
        env["EPIC_EXT_KILL_AT"] = kill_at
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "epic_ext.train", *args], env=env, capture_output=True,
                          text=True, timeout=240, cwd=pathlib.Path(out_dir).parent)
    assert (proc.returncode != 0) == bool(kill_at), (kill_at, proc.stdout[-3000:] + proc.stderr[-6000:])
    return proc


def test_a_rank_killed_while_writing_leaves_an_incomplete_checkpoint_that_resume_skips(assets, tmp_path,
                                                                                       extensions):
    """Rank 1 dies after DeepSpeed's files of step 2, before its own: rank 0 never marks step 2 complete (the
    marker waits for every rank), and two processes resume from step 1 to the uninterrupted run's losses."""
    from epic_ext.train.checkpoint import incomplete

    command = ("--zero", "2", "--max-steps", "3", "--save-steps", "1", "--no-export", "--resume", "auto")
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run_two(assets, reference, extensions, *command)
    run_two(assets, out, extensions, *command, kill_at="checkpoint.deepspeed:2@1")
    ckpt = out / "checkpoints"
    assert incomplete(ckpt / "step0000001") is None and incomplete(ckpt / "step0000002") is not None
    assert not (ckpt / "step0000002" / "epic_rank1.pt").exists()
    proc = run_two(assets, out, extensions, *command)
    assert f"skipped the incomplete checkpoint {ckpt / 'step0000002'}" in proc.stderr
    assert metric_steps(out) == [1, 2, 3] and losses(out) == losses(reference)
    assert checkpoint_dirs(out) == ["step0000002", "step0000003"]
