"""Checkpoints of `python -m epic_ext.train`: saving, finding, checking a resume against them, and loading.

A checkpoint is OUTPUT_DIR/checkpoints/stepNNNNNNN: DeepSpeed's engine state, `epic_rank{r}.pt` per rank (sampler
position, RNG states, step), `epic_run.json` (the run's TrainConfig, world size and ZeRO stage), which a resume
is compared against before anything heavy starts, and `epic_complete.json`, written last: a checkpoint without it
was being written when its run stopped, and resume skips it (`--resume auto`) or refuses it (`--resume DIR`).

Everything here that writes state survives `kill -9` at any moment: files are written under a temporary name and
renamed into place, directories are renamed away before they are deleted, and the marker comes last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import random
import shutil
from dataclasses import asdict

import numpy as np
import torch

from . import faults
from .config import TrainConfig

_logger = logging.getLogger(__name__)

RUN_FILE = "epic_run.json"
MARKER = "epic_complete.json"  # written last, by rank 0 after every rank's files: the checkpoint is complete
REMOVING_PREFIX = ".removing-"  # a directory being deleted is renamed first, so no half-deleted one keeps its name

# TrainConfig fields a resume may change: logging, checkpointing, output and post-training options, and the
# run's length (extending a run; the schedule and learning rate follow the new length from the resumed step on,
# with a warning), and the attention implementation (the same attention computed by another kernel, e.g. a resume
# on a machine without flash-attn). Every other field shapes the batches, schedule draws, optimizer or model, and a change would
# silently make a different run.
RESUME_MAY_CHANGE = frozenset({
    "resume", "output_dir", "save_steps", "keep_checkpoints", "log_steps", "export", "eval_data", "eval_keep",
    "stop_after_steps", "max_skip_fraction", "on_bad_image", "demo_steps", "max_steps", "epochs",
    "attn_implementation", "dry_run", "num_gpus", "num_nodes", "merge_lora",
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


def write_atomic(path: pathlib.Path, data: str | bytes) -> None:
    """Writes `data` to a temporary name beside `path`, flushes it to disk and renames it into place: a reader
    (or a run killed meanwhile) sees the old file or the new one, never a part."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _save_atomic(obj, path: pathlib.Path) -> None:
    """torch.save under a temporary name, renamed into place once flushed to disk."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _fsync_dir(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_dir(path: pathlib.Path, point: str | None = None) -> None:
    """Deletes a directory so that a kill midway leaves no half-deleted one under its name: it is renamed to a
    hidden name first (REMOVING_PREFIX; leftovers are removed by the next rotation or export)."""
    path = pathlib.Path(path)
    doomed = path.with_name(f"{REMOVING_PREFIX}{path.name}.{os.getpid()}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    if point:
        faults.reached(point)
    shutil.rmtree(doomed, ignore_errors=True)


def staging_dir(target: pathlib.Path) -> pathlib.Path:
    """An empty hidden directory beside `target` to write its new content in (then publish_dir); what an
    interrupted earlier attempt left there, or under a REMOVING_PREFIX name, is deleted first."""
    target = pathlib.Path(target)
    staging = target.with_name(f".{target.name}.partial")
    for leftover in [staging, *target.parent.glob(f"{REMOVING_PREFIX}{target.name}.*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return staging


def publish_dir(staging: pathlib.Path, target: pathlib.Path) -> None:
    """Moves a completely written directory into place (replacing `target`): a kill at any moment leaves the
    old `target`, the new one, or none, never a mixture."""
    if target.exists():
        old = target.with_name(f"{REMOVING_PREFIX}{target.name}.{os.getpid()}")
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    _fsync_dir(target.parent)


def _step_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.glob("step*") if p.is_dir()) if root.is_dir() else []


def _step_of(tag: str) -> int:
    digits = tag.removeprefix("step")
    return int(digits) if digits.isdigit() else -1


def incomplete(step_dir: pathlib.Path) -> str | None:
    """None when the checkpoint directory is complete; otherwise what it lacks, e.g. "no epic_complete.json,
    epic_rank0.pt empty". Complete: its completion marker (written last, after every rank's files) is there and
    every file the marker lists has the recorded size. A checkpoint written before the marker existed counts as
    complete when its epic_run.json reads and the epic_rank file of every rank it records loads."""
    step_dir = pathlib.Path(step_dir)
    if not step_dir.is_dir():
        return "no such directory"
    marker = step_dir / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MARKER} unreadable"
        missing = [name for name, size in sorted(listed.items())
                   if not (step_dir / name).is_file() or (step_dir / name).stat().st_size != size]
        return f"{', '.join(missing)} missing or changed since {MARKER} was written" if missing else None
    problems = []
    unfinished = True
    try:
        record = json.loads((step_dir / RUN_FILE).read_text())
        world_size = int(record["world_size"])
        unfinished = bool(record.get("marker"))  # its writer puts the marker last: without it, unfinished
    except FileNotFoundError:
        problems.append(f"{RUN_FILE} missing")
        world_size = 1
    except (ValueError, KeyError, TypeError):
        problems.append(f"{RUN_FILE} unreadable")
        world_size = 1
    for rank in range(world_size):
        state = step_dir / f"epic_rank{rank}.pt"
        if not state.is_file():
            problems.append(f"{state.name} missing")
        elif state.stat().st_size == 0:
            problems.append(f"{state.name} empty")
        elif problems or unfinished:
            continue
        else:
            try:
                torch.load(state, weights_only=False)
            except Exception:  # noqa: BLE001 - a truncated file raises whatever the unpickler meets
                problems.append(f"{state.name} unreadable")
    return ", ".join([f"no {MARKER}", *problems]) if problems or unfinished else None


def find_checkpoint(path: pathlib.Path, auto: bool = False) -> tuple[pathlib.Path, str] | None:
    """(root, tag) of the checkpoint at path: a step directory (which must be complete), or a root whose newest
    complete step is taken (incomplete ones are skipped; see `incomplete`; DeepSpeed's `latest` is not trusted:
    it may name an incomplete one).

    Returns None when `auto` and the root holds no complete checkpoint (a fresh start).

    Raises:
        ValueError: path is an incomplete checkpoint (the message names what it lacks).
        FileNotFoundError: path holds no complete checkpoint.
    """
    path = pathlib.Path(path)
    if path.is_dir() and path.name.startswith("step"):
        problem = incomplete(path)
        if problem:
            raise ValueError(f"--resume: {path} is incomplete ({problem}; a run stopped while writing a checkpoint "
                             "leaves it so): resume from an earlier checkpoint, or --resume auto to take the newest "
                             "complete one")
        return path.parent, path.name
    for step_dir in reversed(_step_dirs(path)):
        if incomplete(step_dir) is None:
            return path, step_dir.name
    if auto:
        return None
    partial = [p.name for p in _step_dirs(path)]
    if partial:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {path} (incomplete: {', '.join(partial)})")
    raise FileNotFoundError(f"--resume: no checkpoint under {path}")


def incomplete_checkpoints(root: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(directory, what it lacks) of every incomplete checkpoint under root."""
    found = []
    for step_dir in _step_dirs(root):
        problem = incomplete(step_dir)
        if problem:
            found.append((step_dir, problem))
    return found


def _saved_run(root: pathlib.Path, tag: str) -> dict:
    """The checkpoint's run record (settings, world size, ZeRO stage)."""
    return json.loads((root / tag / RUN_FILE).read_text())


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
    """Writes checkpoint `step` (every rank calls it); rank 0 marks it complete and then keeps the newest `keep`.

    Order (a kill at any moment leaves either a complete checkpoint or one `incomplete` recognises): a leftover
    directory of the same step is removed; DeepSpeed writes its files (without moving `latest`); every rank
    writes its epic_rank file under a temporary name and renames it; rank 0 its epic_run.json; after a barrier
    rank 0 writes the completion marker (the files and their sizes), then `latest`, then rotates.
    """
    tag = f"step{step:07d}"
    if rank == 0 and (root / tag).exists():
        remove_dir(root / tag)  # left by a killed run (or one resumed from an earlier step)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    faults.reached("checkpoint.deepspeed")
    _save_atomic({"sampler": sampler.state(), "rng": rng_state(), "step": step}, root / tag / f"epic_rank{rank}.pt")
    if rank == 0:
        record = {"step": step, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
                  "config": json.loads(cfg.to_json()), "marker": MARKER}
        write_atomic(root / tag / RUN_FILE, json.dumps(record, indent=2, sort_keys=True))
    _barrier()  # every rank's files are written
    faults.reached("checkpoint.files")
    if rank != 0:
        return
    files = {p.name: p.stat().st_size for p in sorted((root / tag).iterdir())
             if p.is_file() and not p.name.startswith(".")}
    write_atomic(root / tag / MARKER, json.dumps({"step": step, "world_size": world_size, "files": files},
                                                 indent=2, sort_keys=True))
    _fsync_dir(root / tag)
    write_atomic(root / "latest", tag)  # for DeepSpeed's tools (zero_to_fp32.py); resume does not read it
    rotate(root, step, keep)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rotate(root: pathlib.Path, newest: int, keep: int) -> None:
    """After checkpoint `newest` is complete: removes the complete checkpoints older than the `keep` newest up to
    it (keep 0: none), every incomplete one and the leftovers of earlier removals. Complete checkpoints of later
    steps (from a run this one replaced by resuming an earlier step) are left alone."""
    for leftover in root.glob(f"{REMOVING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = []
    for step_dir in _step_dirs(root):
        if _step_of(step_dir.name) == newest:
            continue
        if incomplete(step_dir):
            _logger.info("removing the incomplete checkpoint %s", step_dir)
            remove_dir(step_dir)
        elif _step_of(step_dir.name) < newest:
            complete.append(step_dir)
    if keep > 0:
        for old in complete[: max(len(complete) - (keep - 1), 0)]:
            remove_dir(old, point="checkpoint.rotate")


def load(engine, sampler, path: pathlib.Path, rank: int, auto: bool = False) -> int:
    """Loads the checkpoint at path (see find_checkpoint) into the engine, sampler and RNGs. Returns its step
    (0 when `auto` finds nothing). With `auto`, rank 0 says which incomplete checkpoints it skipped and removes
    them."""
    found = find_checkpoint(path, auto)
    if auto and rank == 0:
        for step_dir, problem in incomplete_checkpoints(pathlib.Path(path)):
            _logger.warning("--resume auto: skipped the incomplete checkpoint %s (%s; the run was stopped while "
                            "writing it): removed", step_dir, problem)
            remove_dir(step_dir)
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
