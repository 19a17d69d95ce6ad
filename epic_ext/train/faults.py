"""Fault injection for tests: EPIC_EXT_KILL_AT=POINT[:N][@RANK] makes the process SIGKILL itself the Nth time
(default 1) it reaches the named point (on every rank, or on rank RANK only), so a test can stop a run at a
chosen moment of start-up, training, checkpoint writing or export, exactly as `kill -9` would.

Points (where they sit is in the code that calls `reached`):
    build_lock              start-up: holding the build lock of a JIT-compiled DeepSpeed op (torch's FileBaton)
    train.step              after a step's metrics row is written, before its checkpoint
    checkpoint.deepspeed    DeepSpeed's files of a checkpoint written, ours not yet
    checkpoint.files        every rank's files written, the completion marker not yet
    checkpoint.rotate       an old checkpoint moved aside for deletion, not yet deleted
    export.weights          the exported weights written, the processor and the move into place not yet

Unset (every real run), `reached` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "EPIC_EXT_KILL_AT"
POINTS = ("build_lock", "train.step", "checkpoint.deepspeed", "checkpoint.files", "checkpoint.rotate",
          "export.weights")
_counts: dict[str, int] = {}


def _spec() -> tuple[str, int, int | None] | None:
    """(point, occurrence, rank or None) of EPIC_EXT_KILL_AT, or None when unset. Raises ValueError (naming the
    variable) for a malformed value or an unknown point."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    point, _, rank = value.partition("@")
    point, _, occurrence = point.partition(":")
    try:
        spec = (point, int(occurrence or 1), int(rank) if rank else None)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: expected POINT[:N][@RANK] with integers N and RANK") from None
    if point not in POINTS:
        raise ValueError(f"{ENV}={value!r}: unknown point {point!r}; points: {', '.join(POINTS)}")
    return spec


def reached(point: str) -> None:
    """Counts one arrival at `point`; SIGKILLs this process when EPIC_EXT_KILL_AT names this arrival."""
    spec = _spec()
    if spec is None or spec[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == spec[1] and spec[2] in (None, int(os.environ.get("RANK", "0"))):
        os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    """Arms the `build_lock` point when EPIC_EXT_KILL_AT names it: wraps torch's FileBaton.try_acquire, which
    torch.utils.cpp_extension.load calls (through DeepSpeed's op builder) before it builds an extension."""
    spec = _spec()
    if spec is None or spec[0] != "build_lock":
        return
    from torch.utils.file_baton import FileBaton  # noqa: PLC0415

    if getattr(FileBaton.try_acquire, "_epic_fault", False):
        return
    acquire = FileBaton.try_acquire

    def try_acquire(self):
        acquired = acquire(self)
        if acquired:
            reached("build_lock")
        return acquired

    try_acquire._epic_fault = True
    FileBaton.try_acquire = try_acquire
