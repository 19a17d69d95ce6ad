"""bench/ablation.py end to end on the smoke profile (a few steps per stage): every stage runs through the
product's code paths, caches, and writes the JSON / Markdown / PNG report."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_profile(tmp_path):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    cmd = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--profile", "smoke", "--work-dir",
           str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    # cwd outside the source tree: the script's `-m epic_ext.train` children must import the installed package
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "zero-shot gap" in proc.stdout
    assert 'stage 2 TCD constants: preset release: {' in proc.stdout
    report = json.loads((tmp_path / "results" / "ablation_smoke-release.json").read_text())
    assert report["preset"] == "release"
    assert set(report["variants"]) == {"zero_shot", "fixed_kd", "lcd_fixed_layer", "tcd", "tcd_no_progressive_ratio",
                                       "icd"}
    assert {(c["better"], c["base"]) for c in report["comparisons"]} == {
        ("tcd", "fixed_kd"), ("tcd", "tcd_no_progressive_ratio"), ("icd", "tcd")}
    assert all(row["seeds"] == 2 for v, t in report["variants"].items() if v != "zero_shot" for row in t)
    assert (tmp_path / "results" / "ablation_smoke-release.png").stat().st_size > 1000
    markdown = (tmp_path / "results" / "ablation_smoke-release.md").read_text()
    for row in ("| TCD |", "| TCD w/o progressive compression ratio (Table 3) |",
                "| LCD w/o progressive compression layer (Table 4) |", "| ICD (Table 5) |"):
        assert row in markdown
    # the schedules the runs used: ICD's two stages (layers 1, 0) and the final TCD range from the first step
    icd_log = (tmp_path / "work" / "stage2" / "release" / "icd" / "seed0" / "metrics.jsonl").read_text()
    assert '"student_layer": 1' in icd_log and '"student_layer": 0' in icd_log
    flat = [json.loads(line) for line in (tmp_path / "work" / "stage2" / "release" / "tcd_no_progressive_ratio"
                                          / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.26 <= row["student_ratio"] <= 0.74 for row in flat)
    # a second run finds every stage cached
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "stage 2: 0 runs to train" in again.stdout
