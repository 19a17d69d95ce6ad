"""`python -m epic_ext.train` on a tiny LLaVA-OneVision checkpoint made offline (the published OneVision chat
template, the PIL OneVision image processor, the shapes task at one 28 px crop: 36 <image> tokens per sample):
DeepSpeed on CPU, the loss decreases, a killed run resumes to the same losses, the export loads with from_pretrained
and generates (batched == per sample under compression, a two-image prompt too), `python -m epic_ext.eval` runs on
it, and records with a video train and resume (videos of different frame counts are refused before start-up)."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers.chat_assets import make_onevision_train_assets
from helpers.train_runs import loss_decreases, losses, one_error_line, resume_matches_uninterrupted, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
VISUAL_TOKENS = 36  # 28 px image: base crop 4x4 + the 1x1 grid's 4x4 map with 4 newline slots


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_onevision_train_assets(tmp_path_factory.mktemp("onevision"))


def test_loss_decreases(assets, tmp_path):
    metrics = loss_decreases(assets, tmp_path)
    row = metrics[14]
    assert 0 < row["teacher_ratio"] < row["student_ratio"] < 1 and row["grad_norm"] is not None


def test_resume_after_kill_matches_uninterrupted(assets, tmp_path):
    # stopped after step 4, whose checkpoint is step 3
    resume_matches_uninterrupted(assets, tmp_path, "--zero", "2", "--max-steps", "6", "--save-steps", "3",
                                 "--schedule", "tcd+lcd", "--method", "dart")


@pytest.fixture(scope="module")
def exported(assets, tmp_path_factory):
    """OUTPUT_DIR/final of a 2-step ZeRO-3 run with --export and the evaluation after training."""
    out = tmp_path_factory.mktemp("exported")
    proc = run_train(assets, out, "--zero", "3", "--max-steps", "2", "--export", "--eval-data", assets["test"],
                     "--eval-keep", "8")
    assert "exported to" in proc.stdout
    table = proc.stdout[proc.stdout.index("exact-match accuracy"):].splitlines()
    assert [line.split()[:3] for line in table[3:]] == [["none", "-", str(VISUAL_TOKENS)], ["fastv", "1", "8"],
                                                        ["dart", "1", "8"], ["random", "1", "8"]]
    return out / "final"


def test_export_loads_back_and_generates(assets, exported):
    import torch
    import transformers
    from PIL import Image

    from epic_ext.models import apply_compression
    from epic_ext.models.families import load_processor
    from epic_ext.data import load_records

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(str(exported)).eval()
    assert not any(torch.isnan(p).any() for p in model.parameters())
    processor = load_processor(str(exported))
    assert processor.layout is not None and processor.image_token == "<image>"
    records = load_records(assets["test"])[:3]
    images = [[Image.open(pathlib.Path(assets["images"]) / r["image"]).convert("RGB")] for r in records]
    images[2] = images[2] + images[0]  # a two-image prompt: base crops only (batch_num_images)
    prompts = [r["conversations"][:1] for r in records]
    prompts[2] = [{**prompts[2][0], "value": "<image>\n" + prompts[2][0]["value"]}]

    def inputs_of(batch):
        return {k: v for k, v in batch.items() if k not in ("labels", "ids") and v is not None}

    inputs = inputs_of(processor.prompt_batch(prompts, images))
    assert inputs["batch_num_images"].tolist() == [1, 1, 2]
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle = apply_compression(model, "fastv", layer=1, keep=3)
        pruned = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        singles = [model.generate(**inputs_of(processor.prompt_batch(prompts[b:b + 1], images[b:b + 1])),
                                  max_new_tokens=3, do_sample=False) for b in range(3)]
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert full.shape == pruned.shape == (3, length + 3)
    for b in range(3):  # batched == per-sample under compression
        assert pruned[b, length:].tolist() == singles[b][0, -3:].tolist(), b


def test_eval_cli_on_the_export(assets, exported, tmp_path, capsys):
    """python -m epic_ext.eval on the OneVision export: --keep required, the uncompressed row, then each method at
    each --keep, the efficiency columns for the items' 36 tokens."""
    from epic_ext.eval import main

    args = ["--model", str(exported), "--data", assets["test"], "--image-folder", assets["images"], "--layer", "1",
            "--max-new-tokens", "2", "--batch-size", "5"]
    assert main([*args, "--method", "fastv"]) == 2
    assert "--keep or --ratio is required for a llava_onevision" in capsys.readouterr().err
    rows_file = tmp_path / "rows.json"
    assert main([*args, "--method", "fastv", "random", "--keep", "8", "2", "--output", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("none", VISUAL_TOKENS), ("fastv", 8), ("fastv", 2),
                                                         ("random", 8), ("random", 2)]
    assert all(r["n"] == 16 and len(r["predictions"]) == 16 for r in rows)
    assert rows[0]["kv_mb"] > rows[1]["kv_mb"] > rows[2]["kv_mb"]
    assert rows[1]["prefill_tflops_exact"] < rows[0]["prefill_tflops_exact"]


def video_records(assets, frames: int = 3, count: int = 24) -> list[dict]:
    """The first `count` training records; the first half get a `video` of `frames` frames (other records' images),
    every other of these without its image."""
    records = json.loads(pathlib.Path(assets["data"]).read_text())[:count]
    for index, record in enumerate(records[: count // 2]):
        record["video"] = [records[(index + k) % count]["image"] for k in range(frames)]
        record["conversations"][0]["value"] = "<video>\n" + record["conversations"][0]["value"]
        if index % 2:
            record.pop("image")
            record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>\n", "")
    return records


def test_video_records_train_and_resume(assets, tmp_path):
    """Records with a `video` beside image records: training runs and a killed run resumes to the same losses."""
    data = tmp_path / "video.json"
    data.write_text(json.dumps(video_records(assets)))
    with_video = {**assets, "data": str(data)}
    args = ("--zero", "2", "--max-steps", "4", "--save-steps", "2", "--micro-batch-size", "3")
    run_train(with_video, tmp_path / "full", *args)
    run_train(with_video, tmp_path / "cut", *args, "--stop-after-steps", "2")
    run_train(with_video, tmp_path / "cut", *args, "--resume", "auto")
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == [1, 2, 3, 4]
    for step in full:
        assert cut[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-7)
        assert full[step]["loss"] > 0


def test_videos_of_different_frame_counts_are_refused_before_start_up(assets, tmp_path):
    records = video_records(assets, count=8)
    records[1]["video"] = records[1]["video"][:2]
    data = tmp_path / "video.json"
    data.write_text(json.dumps(records))
    line = one_error_line(run_train({**assets, "data": str(data)}, tmp_path / "out", "--max-steps", "2",
                                    check=False))
    assert "LLaVA-OneVision batches videos of one frame count; the video records have [2, 3] frames" in line
    assert not (tmp_path / "out").exists()
