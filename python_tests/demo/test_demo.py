"""The demo: its data (multi-turn training records, captions), its bookkeeping (majority baseline, recovery table,
targets) and the committed pretrained checkpoint with its card."""

from __future__ import annotations

import json
import random
import re

import pytest

from epic_ext.cli import UsageError
from epic_ext.demo import model as demo_model
from epic_ext.demo import pipeline as demo
from epic_ext.demo.task import FAMILIES, NUMBER_WORDS, make_shapes_task

_CELL = re.compile(r"(\w+) (\w+) in row (\w+) , column (\w+) \.")


def _scene_from_caption(caption: str) -> dict[tuple[int, int], tuple[str, str]]:
    cells = {}
    for color, shape, row, column in _CELL.findall(caption):
        cells[(NUMBER_WORDS.index(row) - 1, NUMBER_WORDS.index(column) - 1)] = (color, shape)
    assert " ".join(f"{c} {s} in row {NUMBER_WORDS[r + 1]} , column {NUMBER_WORDS[k + 1]} ."
                    for (r, k), (c, s) in sorted(cells.items())) == caption, "caption is not the parsed scene"
    return cells


def _expected_answer(question: str, cells: dict) -> str:
    """The answer recomputed from the caption's scene (an independent reading of the question)."""
    words = question.replace("<image>", "").split()
    if words[:2] == ["what", "color"] or words[:2] == ["what", "shape"]:
        row = NUMBER_WORDS.index(words[words.index("row") + 1]) - 1
        column = NUMBER_WORDS.index(words[words.index("column") + 1]) - 1
        color, shape = cells[(row, column)]
        return color if words[1] == "color" else shape
    if words[:2] == ["how", "many"]:
        what = words[2]
        if what.endswith("s") and what[:-1] in {s for _, s in cells.values()} | {"circle", "square", "triangle"}:
            return NUMBER_WORDS[sum(s == what[:-1] for _, s in cells.values())]
        return NUMBER_WORDS[sum(c == what for c, _ in cells.values())]
    assert words[:3] == ["is", "there", "a"], question
    return "yes" if (words[3], words[4]) in set(cells.values()) else "no"


def test_multi_turn_training_records_answer_their_own_scene(tmp_path):
    splits = make_shapes_task(tmp_path, n_train=40, n_val=6, n_test=6, seed=5, image_size=56, grid=4,
                              train_questions=4, train_caption=True)
    train = json.loads(open(splits["train"]).read())
    for index, record in enumerate(train):
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        assert record["families"] == [FAMILIES[(index + k) % 4] for k in range(4)] + ["describe"]
        assert record["family"] == record["families"][0] and record["answer"] == turns[1]["value"]
        assert turns[8]["value"] == "describe the image ."
        cells = _scene_from_caption(turns[9]["value"])
        assert 2 <= len(cells) <= 6 and all(0 <= r < 4 and 0 <= c < 4 for r, c in cells)
        for question, answer in zip(turns[0:8:2], turns[1:8:2]):
            assert _expected_answer(question["value"], cells) == answer["value"], (record["id"], question)
    for split in ("val", "test"):
        for record in json.loads(open(splits[split]).read()):
            assert len(record["conversations"]) == 2 and "families" not in record


def test_one_question_records_are_unchanged_by_the_new_options(tmp_path):
    plain = make_shapes_task(tmp_path / "a", 12, 4, 4, seed=2)
    explicit = make_shapes_task(tmp_path / "b", 12, 4, 4, seed=2, train_questions=1, train_caption=False)
    for split in plain:
        assert open(plain[split]).read() == open(explicit[split]).read()
    with pytest.raises(ValueError, match="train_questions"):
        make_shapes_task(tmp_path / "c", 4, 1, 1, train_questions=0)


def test_majority_baseline_uses_every_training_turn():
    train = [{"families": ["color", "exist"], "conversations": [
                 {"from": "human", "value": "q"}, {"from": "gpt", "value": "red"},
                 {"from": "human", "value": "q"}, {"from": "gpt", "value": "no"}]},
             {"family": "color", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]},
             {"family": "color", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "Blue"}]}]
    test = [{"family": "color", "answer": "red"}, {"family": "color", "answer": "blue"},
            {"family": "exist", "answer": "no"}, {"family": "exist", "answer": "yes"},
            {"family": "count", "answer": "one"}]
    result = demo.majority_baseline(train, test)
    assert result["answers"] == {"color": "red", "exist": "no"}
    assert result["families"] == {"color": 50.0, "count": 0.0, "exist": 50.0}
    assert result["accuracy"] == pytest.approx(40.0)


def _row(method, keep, accuracy, gflops=1.0):
    return {"method": method, "keep": keep, "accuracy": accuracy, "prefill_tflops_exact": gflops / 1000,
            "kv_mb": keep / 10}


def test_recovery_table_measures_from_the_pretrained_full_accuracy():
    before = [_row("none", 16, 80.0), _row("random", 4, 60.0), _row("fastv", 4, 82.0)]
    after = [_row("none", 16, 78.0), _row("random", 4, 70.0), _row("fastv", 4, 75.0)]
    table = {r["method"]: r for r in demo.recovery_table(before, after)}
    assert table["random"]["drop_before"] == pytest.approx(20.0)
    assert table["random"]["recovered"] == pytest.approx(0.5)
    assert table["random"]["drop_after"] == pytest.approx(8.0)
    assert table["fastv"]["recovered"] is None  # no drop to recover
    text = demo.format_table(before, after, list(table.values()), 16, 1)
    assert "50%" in text and "4/16" in text


def test_settings_cover_every_method_and_fraction():
    settings = demo.settings_for(16, 1)
    assert settings[0]["keep"] == 16
    assert sorted((s["method"], s["keep"]) for s in settings[1:]) == sorted(
        (m, k) for m in demo.METHODS for k in (8, 4, 2))
    assert all(s["layer"] == 1 for s in settings)


def test_targets_name_what_is_missed():
    test = {"accuracy": 74.0, "families": {"color": 90.0, "exist": 60.0},
            "majority": {"families": {"color": 20.0, "exist": 50.0}}}
    problems = demo_model.check_targets(test)
    assert len(problems) == 2 and "74.0%" in problems[0] and problems[1].startswith("exist")
    test.update(accuracy=80.0, families={"color": 90.0, "exist": 66.0})
    assert demo_model.check_targets(test) == []


def test_missing_card_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="demo model is missing"):
        demo.load_card(tmp_path)


def test_committed_demo_model_meets_its_targets_and_loads():
    """The checkpoint in the package: its card's test numbers meet the demo's targets, the layer was chosen on the
    validation split, and the model loads and answers a test question of the card's task correctly often enough."""
    card = demo.load_card()
    assert demo_model.check_targets(card["test"]) == []
    assert card["demo"]["chosen_on"] == "validation split"
    drops = card["demo"]["val_drops"][str(card["demo"]["layer"])]
    assert drops[card["demo"]["method"]] >= demo_model.DROP_TARGET
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(demo.ASSET_DIR))
    processor = AutoProcessor.from_pretrained(str(demo.ASSET_DIR))
    assert model.config.image_seq_length == card["model"]["visual_tokens"]
    assert sum(p.numel() for p in model.parameters()) == card["model"]["parameters"]
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


def test_demo_runs_end_to_end_small(tmp_path):
    """The whole demo on a few records and steps: every stage, the summary and the plot."""
    import subprocess
    import sys

    script = (
        "import sys; from epic_ext.demo import pipeline; "
        "pipeline.DEMO_TRAIN_RECORDS, pipeline.DEMO_TEST_RECORDS = 64, 24; "
        "from epic_ext.demo.__main__ import main; "
        f"sys.exit(main(['--steps', '3', '--output-dir', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["n_test"] == 24 and summary["epic_run"]["steps"] == 3
    assert len(summary["recovery"]) == len(demo.METHODS) * len(demo.FRACTIONS)
    assert set(summary["wall_times_s"]) == {"data_s", "eval_before_s", "epic_train_s", "eval_after_s", "total_s"}
    assert summary["majority_baseline"]["accuracy"] >= 0 and (tmp_path / "demo_accuracy.png").stat().st_size > 1000
    assert "recovered by EPIC" in proc.stdout and "python -m epic_ext.eval" in proc.stdout
    random.seed(0)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "error: --steps must be >= 1, got 0"),
    (["--method", "fastvv"], "error: --method must be one of"),
    (["--schedule", "nope"], "python -m epic_ext.demo: error: argument --schedule: invalid choice"),
    (["--lr", "0"], "error: --lr must be > 0"),
    (["--bogus"], "python -m epic_ext.demo: error: unrecognized arguments: --bogus"),
])
def test_demo_command_line_fails_fast(tmp_path, argv, message):
    """`python -m epic_ext.demo` with a bad option: one error line, exit status 2, nothing trained (in seconds)."""
    import subprocess
    import sys
    import time

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "epic_ext.demo", *argv, "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]
    assert not (tmp_path / "out" / "epic").exists() and time.perf_counter() - started < 120


def test_demo_model_special_token_ids_are_the_tokenizer_s():
    """generate() on the committed model stops at the tokenizer's </s>: the config and generation config name the
    tokenizer's own begin / end / padding ids."""
    from transformers import AutoProcessor, GenerationConfig, LlavaConfig

    tokenizer = AutoProcessor.from_pretrained(str(demo.ASSET_DIR)).tokenizer
    config = LlavaConfig.from_pretrained(str(demo.ASSET_DIR)).text_config
    generation = GenerationConfig.from_pretrained(str(demo.ASSET_DIR))
    expected = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == expected
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == expected
