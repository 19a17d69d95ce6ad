"""`python -m epic_ext.train` on a tiny LLaVA-NeXT checkpoint made offline (the llava-1.5 / NeXT-Vicuna prompt, a
LlavaNextProcessor with the PIL NeXT image processor, the shapes task with training images of four aspect ratios: 10
to 24 <image> tokens and 2 to 5 crops per sample): DeepSpeed on CPU, the loss decreases, two processes give one's
losses, a killed run resumes to the same losses, the export loads with from_pretrained and generates (batched == per
sample under compression, a two-image prompt too), and `python -m epic_ext.eval` runs on it."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers.next_assets import make_next_train_assets
from helpers.train_runs import loss_decreases, losses, resume_matches_uninterrupted, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
VISUAL_TOKENS = 24  # a 56 px test image: base crop 2x2 + the 2x2 grid's 4x4 map with 4 newline slots


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_next_train_assets(tmp_path_factory.mktemp("next"))


def test_loss_decreases(assets, tmp_path):
    metrics = loss_decreases(assets, tmp_path)
    row = metrics[14]
    assert 0 < row["teacher_ratio"] < row["student_ratio"] < 1 and row["grad_norm"] is not None


def test_two_processes_match_one(assets, tmp_path):
    """Two ranks, each padding its own micro-batch's crops (2 to 5 per image), give one rank's losses with twice the
    accumulation: the padded crops change nothing."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(assets, one, "--zero", "2", "--max-steps", "3", "--grad-accum", "2", "--micro-batch-size", "2")
    run_train(assets, two, "--zero", "2", "--max-steps", "3", "--grad-accum", "1", "--micro-batch-size", "2", nproc=2)
    a, b = losses(one), losses(two)
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4), step
        assert a[step]["student_ratio"] == b[step]["student_ratio"]


def test_resume_after_kill_matches_uninterrupted(assets, tmp_path):
    # stopped after step 4, whose checkpoint is step 3; ZeRO-3 with DART (its pivots read the image_newline slots too)
    resume_matches_uninterrupted(assets, tmp_path, "--zero", "3", "--max-steps", "6", "--save-steps", "3",
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

    from epic_ext.data import load_records
    from epic_ext.eval import prompt_inputs
    from epic_ext.models import apply_compression
    from epic_ext.models.families import load_processor

    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(exported)).eval()
    assert not any(torch.isnan(p).any() for p in model.parameters())
    processor = load_processor(str(exported))
    assert type(processor).__name__ == "LlavaNextProcessor"
    records = load_records(assets["test"])[:3]
    folder = pathlib.Path(assets["images"])
    items = [{"question": r["conversations"][0]["value"], "images": [folder / r["image"]]} for r in records]
    wide = Image.open(folder / records[0]["image"]).convert("RGB").resize((56, 28))
    items[2] = {"question": "<image>\n" + items[2]["question"], "images": [wide, folder / records[2]["image"]]}
    processor.tokenizer.padding_side = "left"
    inputs = prompt_inputs(processor, items)
    assert inputs["image_sizes"].tolist() == [[56, 56], [56, 56], [28, 56], [56, 56]]
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        handle = apply_compression(model, "fastv", layer=1, keep=6)
        pruned = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        singles = [model.generate(**prompt_inputs(processor, items[b:b + 1]), max_new_tokens=3, do_sample=False)
                   for b in range(3)]
        handle.remove()
    length = inputs["input_ids"].shape[1]
    assert full.shape == pruned.shape == (3, length + 3)
    for b in range(3):  # batched == per-sample under compression
        assert pruned[b, length:].tolist() == singles[b][0, -3:].tolist(), b


def test_eval_cli_on_the_export(assets, exported, tmp_path, capsys):
    """python -m epic_ext.eval on the NeXT export: --keep required (the count varies with the image size), the
    uncompressed row, then each method at each --keep, the efficiency columns for the items' 24 tokens."""
    from epic_ext.eval import main

    args = ["--model", str(exported), "--data", assets["test"], "--image-folder", assets["images"], "--layer", "1",
            "--max-new-tokens", "2", "--batch-size", "5"]
    assert main([*args, "--method", "fastv"]) == 2
    assert "--keep or --ratio is required for a llava_next" in capsys.readouterr().err
    rows_file = tmp_path / "rows.json"
    assert main([*args, "--method", "fastv", "random", "--keep", "8", "2", "--output", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("none", VISUAL_TOKENS), ("fastv", 8), ("fastv", 2),
                                                         ("random", 8), ("random", 2)]
    assert all(r["n"] == 16 and len(r["predictions"]) == 16 for r in rows)
    assert rows[0]["kv_mb"] > rows[1]["kv_mb"] > rows[2]["kv_mb"]
    assert rows[1]["prefill_tflops_exact"] < rows[0]["prefill_tflops_exact"]
