"""The stage cache of the demo model and the ablation (epic_ext.demo.stages): an entry is complete or absent, so an
interrupted pipeline reruns the interrupted stage and nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from epic_ext.demo import stages


def test_a_stage_runs_once_and_its_result_is_cached(tmp_path):
    calls = []
    cache = stages.Stages(tmp_path / "work", log=lambda message: None)
    assert cache.run("data", lambda: calls.append(1) or {"n": 3}) == {"n": 3}
    assert cache.run("data", lambda: calls.append(1) or {"n": 4}) == {"n": 3}
    assert calls == [1] and json.loads((tmp_path / "work" / "data.json").read_text()) == {"n": 3}


def test_a_failed_stage_leaves_no_entry_and_runs_again(tmp_path):
    cache = stages.Stages(tmp_path, log=lambda message: None)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("train", interrupted)
    assert not cache.path("train").exists()
    assert cache.run("train", lambda: {"done": True}) == {"done": True}


def test_a_write_cut_short_keeps_the_old_entry(tmp_path, monkeypatch):
    """A kill while the JSON is being written (here: the encoder fails half-way) never leaves a truncated entry."""
    path = tmp_path / "history.json"
    stages.write_json(path, [{"steps": 2000}])

    def broken_dump(value, handle, **kwargs):
        handle.write('[{"steps": 20')
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        stages.write_json(path, [{"steps": 2000}, {"steps": 4000}])
    monkeypatch.undo()
    assert stages.read_json(path) == [{"steps": 2000}]


def test_sigkill_while_writing_leaves_the_old_or_the_new_entry(tmp_path):
    """A process SIGKILLed at several moments while it rewrites an entry again and again: the entry always reads."""
    path = tmp_path / "stage.json"
    stages.write_json(path, {"round": -1, "payload": "x" * 400000})
    script = textwrap.dedent(f"""
        import sys
        from epic_ext.demo import stages
        print("ready", flush=True)
        for round in range(1_000_000):
            stages.write_json({str(path)!r}, {{"round": round, "payload": "x" * 400000}})
    """)
    rounds = []
    for delay in (0.01, 0.05, 0.1, 0.2, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        entry = stages.read_json(path)
        assert entry["payload"] == "x" * 400000
        rounds.append(entry["round"])
    assert rounds[-1] > 0  # the writer did rewrite the entry before it was killed


def test_replace_dir_swaps_a_whole_directory(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "model.safetensors").write_text("new weights")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model.safetensors").write_text("old weights")
    (tmp_path / "best" / "stale.json").write_text("{}")
    stages.replace_dir(tmp_path / "new", tmp_path / "best")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["model.safetensors"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "new"]  # no staging leftovers
