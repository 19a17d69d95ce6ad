"""Checkpoints of `python -m epic_ext.train`: saving, finding, checking a resume against them, and loading.

A checkpoint is OUTPUT_DIR/checkpoints/stepNNNNNNN: DeepSpeed's engine state, `epic_rank{r}.pt` per rank (sampler
position, RNG states, step) and `epic_run.json` (the run's TrainConfig, world size and ZeRO stage), which a resume
is compared against before anything heavy starts.
"""

from __future__ import annotations

import json
import logging
import pathlib
import random
import shutil
from dataclasses import asdict

import numpy as np
import torch

from .config import TrainConfig

_logger = logging.getLogger(__name__)

RUN_FILE = "epic_run.json"

# TrainConfig fields a resume may change: logging, checkpointing, output and post-training options, and the
# run's length (extending a run; the schedule and learning rate follow the new length from the resumed step on,
# with a warning). Every other field shapes the batches, schedule draws, optimizer or model, and a change would
# silently make a different run.
RESUME_MAY_CHANGE = frozenset({
    "resume", "output_dir", "save_steps", "keep_checkpoints", "log_steps", "export", "eval_data", "eval_keep",
    "stop_after_steps", "max_skip_fraction", "on_bad_image", "demo_steps", "max_steps", "epochs",
})
_LENGTH = ("max_steps", "epochs")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_checkpoint(path: pathlib.Path, auto: bool = False) -> tuple[pathlib.Path, str] | None:
    """(root, tag) of the checkpoint at path: a step directory, or a root whose latest step is taken.

    Returns None when `auto` and the root holds no checkpoint (a fresh start). Raises FileNotFoundError otherwise.
    """
    if path.is_dir() and path.name.startswith("step"):
        return path.parent, path.name
    latest = path / "latest"
    tags = sorted(p.name for p in path.glob("step*") if p.is_dir()) if path.is_dir() else []
    if latest.is_file() and (path / latest.read_text().strip()).is_dir():
        return path, latest.read_text().strip()
    if tags:
        return path, tags[-1]
    if auto:
        return None
    raise FileNotFoundError(f"--resume: no checkpoint under {path}")


def _saved_run(root: pathlib.Path, tag: str) -> dict:
    """The checkpoint's run record; checkpoints written before epic_run.json existed fall back to the output
    directory's train_config.json and count their ranks from the epic_rank files."""
    record_file = root / tag / RUN_FILE
    if record_file.is_file():
        return json.loads(record_file.read_text())
    legacy = root.parent / "train_config.json"
    return {"config": json.loads(legacy.read_text()) if legacy.is_file() else None,
            "world_size": len(list((root / tag).glob("epic_rank*.pt"))) or None, "zero_stage": None}


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_resume(cfg: TrainConfig, world_size: int, zero_stage: int) -> None:
    """Refuses (ValueError naming --resume and every difference) a resume whose settings differ from the ones
    the checkpoint was written with, outside RESUME_MAY_CHANGE; also a changed ZeRO stage or world size, which
    this loader cannot re-shard. Does nothing without --resume or when `--resume auto` finds no checkpoint."""
    if not cfg.resume:
        return
    auto = cfg.resume == "auto"
    found = find_checkpoint(pathlib.Path(cfg.output_dir) / "checkpoints" if auto else pathlib.Path(cfg.resume), auto)
    if found is None:
        return
    root, tag = found
    saved = _saved_run(root, tag)
    where = root / tag
    if saved["zero_stage"] is not None and saved["zero_stage"] != zero_stage:
        raise ValueError(f"--resume: {where} was written with ZeRO stage {saved['zero_stage']}, this run uses stage "
                         f"{zero_stage}; resume with --zero {saved['zero_stage']} (a checkpoint cannot change stage "
                         "here; convert it with DeepSpeed's universal checkpoint and start a new run)")
    if saved["world_size"] is not None and saved["world_size"] != world_size:
        raise ValueError(f"--resume: {where} was written by {saved['world_size']} processes, this run has "
                         f"{world_size}; resume with {saved['world_size']} processes (a checkpoint cannot be "
                         "re-sharded here)")
    if saved["config"] is None:
        _logger.warning("--resume: %s records no settings; they are not compared", where)
        return
    current = json.loads(cfg.to_json())  # the run's resolved settings (Run.cfg), as train_config.json holds them
    defaults = asdict(TrainConfig())
    differences = [f"{_option(key)} {current.get(key, defaults.get(key))!r} "
                   f"(checkpoint: {saved['config'].get(key, defaults.get(key))!r})"
                   for key in sorted(set(current) | set(saved["config"]))
                   if key not in RESUME_MAY_CHANGE
                   and current.get(key, defaults.get(key)) != saved["config"].get(key, defaults.get(key))]
    length = [f"{_option(key)} {saved['config'].get(key)!r} -> {current.get(key)!r}" for key in _LENGTH
              if key in saved["config"] and saved["config"][key] != current[key]]
    if length and not differences:
        _logger.warning("--resume: the run's length changed (%s): the schedule and learning rate follow the new "
                        "length from step %s on", ", ".join(length), tag.removeprefix("step").lstrip("0") or "0")
    if differences:
        allowed = ", ".join(_option(key) for key in sorted(RESUME_MAY_CHANGE - {"resume", "stop_after_steps"}))
        raise ValueError(f"--resume: {where} was written with other settings: {'; '.join(differences)}. Only "
                         f"{allowed} may change on resume")


def save(engine, sampler, root: pathlib.Path, step: int, rank: int, keep: int, cfg: TrainConfig,
         world_size: int) -> None:
    """Writes checkpoint `step` (every rank calls it) and keeps the newest `keep` on rank 0."""
    tag = f"step{step:07d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    torch.save({"sampler": sampler.state(), "rng": rng_state(), "step": step}, root / tag / f"epic_rank{rank}.pt")
    if rank == 0:
        record = {"step": step, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
                  "config": json.loads(cfg.to_json())}
        (root / tag / RUN_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0 and keep > 0:
        tags = sorted(p for p in root.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load(engine, sampler, path: pathlib.Path, rank: int, auto: bool = False) -> int:
    """Loads the checkpoint at path (see find_checkpoint) into the engine, sampler and RNGs. Returns its step
    (0 when `auto` finds nothing)."""
    found = find_checkpoint(path, auto)
    if found is None:
        return 0
    root, tag = found
    loaded, _ = engine.load_checkpoint(str(root), tag=tag)
    if loaded is None:
        raise FileNotFoundError(f"--resume: DeepSpeed could not load {root / tag}")
    state = torch.load(root / tag / f"epic_rank{rank}.pt", weights_only=False)
    sampler.load(state["sampler"])
    set_rng_state(state["rng"])
    _logger.info("resumed from %s at step %d", root / tag, state["step"])
    return int(state["step"])

