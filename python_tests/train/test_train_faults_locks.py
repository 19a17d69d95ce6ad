"""Stale build locks (epic_ext.train.locks): torch's JIT extension loader, which DeepSpeed builds its ops with,
waits forever on a lock file left by a killed process. A lock nobody holds is removed with a warning; one that a
live process holds, or whose folder a leftover build still works in, is waited for, and the wait said once."""

from __future__ import annotations

import logging
import shutil
import pathlib
import signal
import subprocess
import sys
import textwrap
import time


from epic_ext.train import locks

HOLD = textwrap.dedent("""
    import os, signal, sys, time
    from torch.utils.file_baton import FileBaton
    baton = FileBaton(sys.argv[1])
    assert baton.try_acquire()
    print("held", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[2]))
    baton.release()
""")


def take_lock(lock: pathlib.Path, then: str) -> subprocess.Popen:
    """A process that takes `lock` as torch's extension loader does, then is killed ("kill") or holds it for
    `then` seconds and releases it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), then], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held" or then == "kill"
    return proc


def test_a_lock_left_by_a_killed_process_is_removed_with_a_warning(tmp_path, caplog):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    proc = take_lock(lock, "kill")
    assert proc.wait(timeout=60) == -signal.SIGKILL and lock.is_file()
    with caplog.at_level(logging.WARNING, logger="epic_ext.train.locks"):
        assert locks.clear_stale_build_locks(tmp_path, min_age_s=0) == [lock]
    assert not lock.exists()
    assert f"removed the stale build lock {lock}: no process holds it" in caplog.text


def test_a_held_lock_is_waited_for_and_the_wait_said_once(tmp_path, caplog):
    lock = tmp_path / "fused_adam" / "lock"
    proc = take_lock(lock, "3")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="epic_ext.train.locks"):
        assert locks.clear_stale_build_locks(tmp_path, min_age_s=0, poll_s=0.1) == []
    assert proc.wait(timeout=60) == 0 and time.perf_counter() - started > 1
    waits = [r.getMessage() for r in caplog.records if "waiting for the build lock" in r.getMessage()]
    assert len(waits) == 1 and f"pid {proc.pid}" in waits[0] and "holds it" in waits[0], caplog.text
    assert "removed" not in caplog.text


def test_a_build_still_running_in_the_folder_is_waited_for(tmp_path, caplog):
    """kill -9 of the Python process leaves its ninja and compiler running: the lock is removed after them."""
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    assert take_lock(lock, "kill").wait(timeout=60) == -signal.SIGKILL
    ninja = tmp_path / "bin" / "ninja"  # a stand-in: a process named ninja that works for 2 s
    ninja.parent.mkdir()
    ninja.symlink_to(shutil.which("sleep"))
    shell = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # someone's shell in the folder does not count
    build = subprocess.Popen([str(ninja), "2"], cwd=lock.parent)
    try:
        with caplog.at_level(logging.WARNING, logger="epic_ext.train.locks"):
            assert locks.clear_stale_build_locks(tmp_path, min_age_s=0, poll_s=0.1) == [lock]
        assert build.poll() == 0  # removed only after the build in the folder ended
        assert f"pid {build.pid} ({ninja} 2) still works in its folder" in caplog.text
    finally:
        shell.kill()
        shell.wait()


def test_a_fresh_lock_is_not_taken_for_a_stale_one(tmp_path):
    """A lock nobody holds yet (or any more) is left alone until it is MIN_AGE_S old: created or released while
    it is looked at, it must not be removed from under its owner."""
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    created = lock.stat().st_mtime
    assert locks.clear_stale_build_locks(tmp_path, min_age_s=1.5, poll_s=0.1) == [lock]
    assert time.time() - created >= 1.5


def test_the_extensions_root_follows_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert locks.extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    from torch.utils.cpp_extension import _get_build_directory

    probe = pathlib.Path(_get_build_directory("epic_ext_probe", False))  # torch creates the folder
    probe.rmdir()
    assert locks.extensions_root() == probe.parent
