"""`python -m epic_ext.train --dry-run`: every preflight check, the parameter counts and DeepSpeed's memory estimate
of the model states, from a checkpoint's config.json alone (no weights are read), then exit; nothing is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from helpers.train_runs import one_error_line  # noqa: E402

from epic_ext.models.families import FAMILIES, parameter_parts  # noqa: E402
from epic_ext.train.config import TrainConfig  # noqa: E402
from epic_ext.train.estimate import deepspeed_estimate, parameter_counts  # noqa: E402
from epic_ext.train.preflight import preflight  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA-1.5's config.json only (no weights), and one record."""
    root = tmp_path_factory.mktemp("dry")
    model = FAMILIES["llava"].build_tiny(seed=0)
    model.config.save_pretrained(str(root / "model"))
    (root / "data.json").write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    return {"root": root, "model": str(root / "model"), "data": str(root / "data.json"), "reference": model}


def test_parameter_counts_are_the_models(checkpoint):
    """Counted on the meta device from the config = counted on the built model."""
    model = checkpoint["reference"]
    run = preflight(TrainConfig(model=checkpoint["model"], data=checkpoint["data"], layer=1, freeze_vision=True))
    counts = parameter_counts(run)
    parts = {name: sum(p.numel() for p in params) for name, params in parameter_parts(model).items()}
    assert {key: counts[key] for key in parts} == parts
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == parts["projector"] + parts["llm"]
    assert counts["largest_layer"] == max(sum(p.numel() for p in m.parameters(recurse=False))
                                          for m in model.modules())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_estimate_is_deepspeeds_formula(stage):
    """ZeRO's model-state bytes per GPU without offload: 2 bytes of 16-bit parameters + 18 bytes of gradients,
    fp32 master weights and Adam moments per parameter, the 18 partitioned over the GPUs (stage 0: not
    partitioned); stage 3 partitions the 16-bit parameters too and holds the largest layer (4 bytes per
    parameter) whole."""
    counts = {"total": 7_063_000_000, "largest_layer": 131_000_000}
    gpus = 8
    got = deepspeed_estimate(counts, stage, gpus, 1)
    expected = {0: 2 * counts["total"] + 18 * counts["total"],
                1: 2 * counts["total"] + int(18 * counts["total"] / gpus),
                2: 2 * counts["total"] + int(18 * counts["total"] / gpus),
                3: 4 * counts["largest_layer"] + int(18 * counts["total"] / gpus)}[stage]
    assert got["gpu_bytes"] == expected
    assert "per GPU" in got["table"]


def test_the_command_prints_the_estimate_and_starts_nothing(checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", "--model", checkpoint["model"], "--data",
                           checkpoint["data"], "--layer", "1", "--zero", "3", "--num-gpus", "8", "--dry-run",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ZeRO 3, 8 GPU(s) x 1 node(s)" in proc.stdout
    total = sum(p.numel() for p in checkpoint["reference"].parameters())
    assert re.search(rf"total {total / 1e6:,.1f}M", proc.stdout)
    assert not out.exists()  # no run directory, no DeepSpeed start, no weights (there are none to read)


def test_bad_planned_cluster_is_one_line(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epic_ext.train", "--model", checkpoint["model"], "--data",
                           checkpoint["data"], "--layer", "1", "--dry-run", "--num-nodes", "0"],
                          capture_output=True, text=True, timeout=300)
    assert "--num-nodes" in one_error_line(proc)
