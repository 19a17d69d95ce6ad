"""`python -m epic_ext.train` on the chat-template families (tiny Qwen2.5-VL and Qwen3-VL checkpoints made offline,
the Qwen chat template): DeepSpeed on CPU, the loss decreases, a killed run resumes to the same losses, the export
loads with from_pretrained and generates (compressed too), and an unsupported family is a one-line error."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers.chat_assets import make_qwen_train_assets
from helpers.train_runs import loss_decreases, losses, one_error_line, resume_matches_uninterrupted, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def assets(request, tmp_path_factory):
    return make_qwen_train_assets(tmp_path_factory.mktemp(request.param), request.param)


def test_loss_decreases(assets, tmp_path):
    metrics = loss_decreases(assets, tmp_path)
    row = metrics[14]
    assert row["teacher_ratio"] < row["student_ratio"] and row["grad_norm"] is not None
    # every sample's 9 visual tokens are its whole budget: the student keeps fewer than the teacher
    assert 0 < row["student_ratio"] < 1


def test_resume_after_kill_matches_uninterrupted(assets, tmp_path):
    # stopped after step 4, whose checkpoint is step 3
    resume_matches_uninterrupted(assets, tmp_path, "--zero", "2", "--max-steps", "6", "--save-steps", "3",
                                 "--schedule", "tcd+lcd", "--method", "dart")


@pytest.fixture(scope="module")
def exported(assets, tmp_path_factory):
    """OUTPUT_DIR/final of a 2-step ZeRO-3 run with --export and the evaluation after training."""
    out = tmp_path_factory.mktemp("exported")
    line = one_error_line(run_train(assets, out, "--zero", "3", "--max-steps", "2", "--eval-data", assets["test"],
                                    check=False))
    assert "--eval-keep is required with --eval-data for a qwen" in line
    proc = run_train(assets, out, "--zero", "3", "--max-steps", "2", "--export", "--eval-data", assets["test"],
                     "--eval-keep", "3")
    assert "exported to" in proc.stdout
    table = proc.stdout[proc.stdout.index("exact-match accuracy"):].splitlines()
    assert [line.split()[:3] for line in table[3:]] == [["none", "-", "9"], ["fastv", "1", "3"], ["dart", "1", "3"],
                                                        ["random", "1", "3"]]
    return out / "final"


def test_export_loads_back_and_generates(assets, exported):
    import torch
    import transformers
    from PIL import Image

    from epic_ext.models import apply_compression
    from epic_ext.models.families import load_processor
    from epic_ext.data import load_records

    final = exported
    config = json.loads((final / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    assert model_class.__name__.startswith(("Qwen2_5_VL", "Qwen3VL"))
    model = model_class.from_pretrained(str(final)).eval()
    assert not any(torch.isnan(p).any() for p in model.parameters())
    processor = load_processor(str(final))
    records = load_records(assets["test"])[:3]
    images = [[Image.open(pathlib.Path(assets["images"]) / r["image"]).convert("RGB")] for r in records]
    batch = processor.prompt_batch([r["conversations"][:1] for r in records], images)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle = apply_compression(model, "fastv", layer=1, keep=3)
        pruned = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        single = model.generate(**{k: (v[:1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                                   for k, v in processor.prompt_batch([records[0]["conversations"][:1]],
                                                                      images[:1]).items()
                                   if k not in ("labels", "ids")}, max_new_tokens=3, do_sample=False)
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert full.shape == pruned.shape == (3, length + 3)
    assert pruned[0, length:].tolist() == single[0, -3:].tolist()  # batched == per-sample under compression


def test_unsupported_family_is_one_line_error(tmp_path):
    from transformers import LlavaNextVideoConfig

    model_dir = tmp_path / "next_video"  # config.json only: the refusal reads no weights
    LlavaNextVideoConfig().save_pretrained(str(model_dir))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": 0, "conversations": [{"from": "human", "value": "hi"},
                                                              {"from": "gpt", "value": "yes"}]}]))
    proc = run_train({"model": str(model_dir), "data": str(data), "images": str(tmp_path)}, tmp_path / "out",
                     check=False)
    line = one_error_line(proc)
    assert "'llava_next_video' model is not supported" in line
    assert "llava (LlavaForConditionalGeneration), qwen2_5_vl (Qwen2_5_VLForConditionalGeneration)" in line
    assert not (tmp_path / "out").exists()  # refused before DeepSpeed started


def test_eval_cli_on_the_export(assets, exported, tmp_path, capsys):
    """python -m epic_ext.eval on a chat-template checkpoint: the uncompressed row, then each method at each
    --keep (visual tokens per sample: 4 and 2 of each item's 9), the efficiency columns for the items' 9 tokens."""
    from epic_ext.eval import main

    args = ["--model", str(exported), "--data", assets["test"], "--image-folder", assets["images"], "--layer", "1",
            "--max-new-tokens", "2", "--batch-size", "5"]
    assert main([*args, "--method", "fastv"]) == 2
    assert "--keep or --ratio is required for a qwen" in capsys.readouterr().err
    assert main([*args, "--method", "fastv", "random", "--keep", "4", "2", "--output", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("none", 9), ("fastv", 4), ("fastv", 2), ("random", 4),
                                                         ("random", 2)]
    assert all(r["n"] == 16 and len(r["predictions"]) == 16 for r in rows)
    assert rows[0]["kv_mb"] > rows[1]["kv_mb"] > rows[2]["kv_mb"]
    assert rows[1]["prefill_tflops_exact"] < rows[0]["prefill_tflops_exact"]


def test_video_records(assets, tmp_path):
    """Records with a `video` (frame files) beside image records: Qwen2.5-VL and Qwen3-VL (whose prompt carries
    each temporal patch's time) train on them and resume to the same losses."""
    records = json.loads(pathlib.Path(assets["data"]).read_text())[:24]
    for index, record in enumerate(records[:12]):  # every other of these also keeps its image
        record["video"] = [records[(index + k) % 24]["image"] for k in range(3)]
        record["conversations"][0]["value"] = "<video>\n" + record["conversations"][0]["value"]
        if index % 2:
            record.pop("image")
            record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>\n", "")
    data = tmp_path / "video.json"
    data.write_text(json.dumps(records))
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
