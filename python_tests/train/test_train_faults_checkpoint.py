"""What a kill leaves behind, without DeepSpeed (epic_ext.train.checkpoint, the loop's metrics, the fault hook): a
checkpoint is complete or recognised as incomplete, naming what it lacks; resume takes the newest complete one;
rotation removes nothing before the new checkpoint is complete; files and directories are replaced whole."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from epic_ext.train import checkpoint, faults
from epic_ext.train.checkpoint import MARKER, RUN_FILE
from epic_ext.train.config import TrainConfig


class FakeEngine:
    """The two calls checkpoint.save makes of a DeepSpeed engine; save_checkpoint writes one file (or fails)."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, root, tag, client_state, save_latest=True):
        assert not save_latest  # DeepSpeed must not move `latest` to a checkpoint that is not complete yet
        (pathlib.Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if self.fail:
            raise OSError("disk full")

    def zero_optimization_stage(self):
        return 2


class FakeSampler:
    def state(self):
        return {"epoch": 0, "offset": 4}


def save(root, step, keep=2, fail=False):
    checkpoint.save(FakeEngine(fail), FakeSampler(), root, step, rank=0, keep=keep, cfg=TrainConfig(), world_size=1)


def steps(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_a_saved_checkpoint_is_complete_and_lists_its_files(tmp_path):
    save(tmp_path, 1)
    step = tmp_path / "step0000001"
    assert checkpoint.incomplete(step) is None
    listed = json.loads((step / MARKER).read_text())["files"]
    assert sorted(listed) == ["epic_rank0.pt", RUN_FILE, "mp_rank_00_model_states.pt"]
    assert (tmp_path / "latest").read_text() == "step0000001"
    assert not [p for p in step.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_what_an_incomplete_checkpoint_lacks_is_named(tmp_path):
    save(tmp_path, 1)
    step = tmp_path / "step0000001"
    (step / "epic_rank0.pt").unlink()
    assert checkpoint.incomplete(step) == f"epic_rank0.pt missing or changed since {MARKER} was written"
    (step / MARKER).unlink()
    assert checkpoint.incomplete(step) == f"no {MARKER}, epic_rank0.pt missing"


def test_the_state_the_issue_found_is_incomplete(tmp_path):
    """Written before the marker existed: DeepSpeed's files and `latest` moved, epic_rank0.pt empty, no
    epic_run.json. `--resume auto` took it and failed with `EOFError: Ran out of input`."""
    step = tmp_path / "step0000002"
    step.mkdir()
    (step / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (step / "epic_rank0.pt").write_bytes(b"")
    (tmp_path / "latest").write_text(step.name)
    assert checkpoint.incomplete(step) == f"no {MARKER}, {RUN_FILE} missing, epic_rank0.pt empty"
    assert checkpoint.find_checkpoint(tmp_path, auto=True) is None
    with pytest.raises(ValueError, match=r"--resume: .*step0000002 is incomplete \(no epic_complete.json"):
        checkpoint.find_checkpoint(step)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint under .* \(incomplete: step0000002\)"):
        checkpoint.find_checkpoint(tmp_path)


def test_a_complete_checkpoint_from_before_the_marker_still_resumes(tmp_path):
    step = tmp_path / "step0000003"
    step.mkdir()
    (step / RUN_FILE).write_text(json.dumps({"step": 3, "world_size": 2, "zero_stage": 2, "config": {}}))
    torch.save({"step": 3}, step / "epic_rank0.pt")
    assert checkpoint.incomplete(step) == f"no {MARKER}, epic_rank1.pt missing"
    (step / "epic_rank1.pt").write_bytes(b"PK\x03\x04 cut short")
    assert checkpoint.incomplete(step) == f"no {MARKER}, epic_rank1.pt unreadable"
    torch.save({"step": 3}, step / "epic_rank1.pt")
    assert checkpoint.incomplete(step) is None


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=0)
    (tmp_path / "step0000003" / MARKER).unlink()
    (tmp_path / "latest").write_text("step0000003")  # as DeepSpeed's save_checkpoint left it
    assert checkpoint.find_checkpoint(tmp_path, auto=True) == (tmp_path, "step0000002")
    assert [p.name for p, _ in checkpoint.incomplete_checkpoints(tmp_path)] == ["step0000003"]


def test_a_failed_save_removes_nothing(tmp_path):
    save(tmp_path, 1, keep=1)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, keep=1, fail=True)
    assert steps(tmp_path) == ["step0000001", "step0000002"]
    assert checkpoint.find_checkpoint(tmp_path, auto=True) == (tmp_path, "step0000001")
    save(tmp_path, 2, keep=1)  # the same step again: the leftover is replaced, then the old one rotated out
    assert steps(tmp_path) == ["step0000002"] and checkpoint.incomplete(tmp_path / "step0000002") is None


def test_rotation_keeps_the_newest_and_clears_leftovers(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=0)
    partial = tmp_path / "step0000009"
    partial.mkdir()
    (tmp_path / f"{checkpoint.REMOVING_PREFIX}step0000000.123").mkdir()  # a rotation killed midway
    save(tmp_path, 4, keep=2)
    assert steps(tmp_path) == ["step0000003", "step0000004"]


def test_publish_dir_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    staging = checkpoint.staging_dir(target)
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    checkpoint.publish_dir(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]


def test_staging_dir_clears_an_interrupted_attempt(tmp_path):
    target = tmp_path / "final"
    leftovers = [tmp_path / ".final.partial", tmp_path / f"{checkpoint.REMOVING_PREFIX}final.77"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")
    assert checkpoint.staging_dir(target) == leftovers[0]
    assert not any(p.exists() for p in leftovers)


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "train_config.json"
    path.write_text("old")
    checkpoint.write_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["train_config.json"]


def test_metrics_after_the_resumed_step_and_a_cut_row_are_dropped(tmp_path):
    pytest.importorskip("transformers")
    from epic_ext.train.loop import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    _truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize("value, message", [
    ("checkpoint.nowhere", "unknown point 'checkpoint.nowhere'"),
    ("train.step:two", "expected POINT[:N][@RANK]"),
])
def test_a_malformed_kill_point_is_named(monkeypatch, value, message):
    monkeypatch.setenv(faults.ENV, value)
    with pytest.raises(ValueError, match=rf"EPIC_EXT_KILL_AT={value!r}: .*{message}".replace("[", r"\[")):
        faults.reached("train.step")


def test_an_unset_or_other_kill_point_does_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reached("train.step")
    monkeypatch.setenv(faults.ENV, "export.weights:2@1")
    faults.reached("export.weights")  # another rank's, and not its second arrival: the test process lives on
    faults.reached("train.step")
