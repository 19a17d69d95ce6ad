"""Stale build locks of torch's JIT extension loader, found and cleared before DeepSpeed starts.

DeepSpeed JIT-compiles its ops (on CPU: deepspeed_shm_comm, when the process group starts) with
torch.utils.cpp_extension.load, which serialises the builds of one extension with torch.utils.file_baton.FileBaton:
the process that builds creates EXTENSIONS_ROOT/<op>/lock with O_CREAT | O_EXCL, keeps that file descriptor open
while it builds, and removes the file when done; every other process polls until the file is gone, without a
timeout or a message. Every start takes the lock, even with the op already built (ninja runs and finds nothing to
do), so a process killed during any start-up can leave the file behind, and every later run then waits forever.

A lock file is
- held while a live process has it open (/proc/PID/fd): a legitimate wait, reported once;
- still in use while a ninja works inside its folder (a killed build's ninja and compilers run on until they
  finish): also waited for, reported once;
- otherwise stale: removed, with a warning naming the file.
A lock must also be a moment old (MIN_AGE_S) before it counts as stale, so that one created or released while it
is looked at is not mistaken for one. Without /proc (not Linux) nothing can be told apart, and nothing is done.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

_logger = logging.getLogger(__name__)

LOCK_NAME = "lock"  # torch.utils.cpp_extension: FileBaton(os.path.join(build_directory, "lock"))
MIN_AGE_S = 2.0


def extensions_root() -> pathlib.Path:
    """The folder torch builds JIT extensions in: TORCH_EXTENSIONS_DIR, or torch's per-user default
    (mirrors torch.utils.cpp_extension._get_build_directory, which would create the folder)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return pathlib.Path(root)
    import torch  # noqa: PLC0415
    from torch.utils.cpp_extension import get_default_build_root  # noqa: PLC0415

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return pathlib.Path(get_default_build_root()) / f"{python}_{accelerator}"


def _pids() -> list[int]:
    return [int(p.name) for p in pathlib.Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]


def _describe(pid: int) -> str:
    try:
        command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = "?"
    return f"pid {pid} ({command.strip()[:80]})"


def _parent(pid: int) -> int | None:
    try:
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def holders(lock: pathlib.Path) -> list[int]:
    """The processes (other than this one) with `lock` open; those of other users cannot be seen."""
    try:
        target = lock.stat()
    except FileNotFoundError:
        return []
    found = []
    for pid in _pids():
        try:
            fds = list(pathlib.Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                opened = fd.stat()
            except OSError:
                continue
            if (opened.st_dev, opened.st_ino) == (target.st_dev, target.st_ino):
                found.append(pid)
                break
    return found


def workers(folder: pathlib.Path) -> list[int]:
    """The ninja processes (other than this one) working in `folder` or below it: torch builds with ninja, run
    there; it outlives a killed Python process, and its compilers end with it. (Other processes there, e.g. a
    shell someone opened in the folder, do not count.)"""
    folder = folder.resolve()
    found = []
    for pid in _pids():
        try:
            cwd = pathlib.Path(os.readlink(f"/proc/{pid}/cwd"))
            command = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if command == "ninja" and (cwd == folder or folder in cwd.parents):
            found.append(pid)
    return found


def clear_stale_build_locks(root: pathlib.Path | None = None, *, min_age_s: float = MIN_AGE_S,
                            poll_s: float = 0.5) -> list[pathlib.Path]:
    """Removes the stale build locks under the extensions root (see the module's docstring); waits, saying so
    once per lock, while a lock is held or its folder is in use.

    Args:
        root: the extensions root (default: extensions_root()).
        min_age_s: a lock nobody holds is removed once it is this old (seconds since it was created).
        poll_s: seconds between checks while waiting.

    Returns:
        The lock files removed.
    """
    if not pathlib.Path("/proc/self/fd").is_dir():
        return []
    root = extensions_root() if root is None else pathlib.Path(root)
    removed = []
    for lock in sorted(root.glob(f"*/{LOCK_NAME}")):
        said = False
        while True:
            try:
                seen = lock.stat()
            except FileNotFoundError:  # released (or removed by another process of this launch)
                break
            busy = holders(lock)
            what = "holds it"
            if not busy:
                busy, what = workers(lock.parent), "still works in its folder (a build left by a stopped run)"
            if not busy and time.time() - seen.st_mtime >= min_age_s:
                try:
                    if (lock.stat().st_ino, lock.stat().st_mtime) == (seen.st_ino, seen.st_mtime):
                        lock.unlink()
                        _logger.warning("removed the stale build lock %s: no process holds it (a run was stopped "
                                        "while it built or loaded %s); the op is rebuilt if it is incomplete", lock,
                                        lock.parent.name)
                        removed.append(lock)
                        break
                except FileNotFoundError:
                    break
                continue  # replaced meanwhile: look at the new one
            if busy and not said:
                # another process of this launch (same launcher) building is the normal multi-process start-up
                siblings = all(_parent(pid) == os.getppid() for pid in busy)
                _logger.log(logging.INFO if siblings else logging.WARNING, "waiting for the build lock %s: %s %s",
                            lock, ", ".join(map(_describe, busy)), what)
                said = True
            time.sleep(poll_s)
    return removed
