"""`python -m epic_ext.eval`: arguments checked before the model loads (one line, non-zero exit, no traceback);
bad records skipped and counted with the training data's policy, also in the evaluation after training."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers.train_assets import make_train_assets

pytest.importorskip("transformers")

from epic_ext.eval import collect_items, evaluate, main  # noqa: E402
from epic_ext.data import load_records  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("eval_cli"))


@pytest.fixture(scope="module")
def mixed_data(assets, tmp_path_factory):
    """The test split plus a record with no answer and one whose image is missing (18 records)."""
    records = json.loads(pathlib.Path(assets["test"]).read_text())
    records.append({"id": "no-answer", "image": records[0]["image"],
                    "conversations": [{"from": "human", "value": "<image>\nwhat is it ?"}]})
    records.append({"id": "lost", "image": "images/lost.png",
                    "conversations": [{"from": "human", "value": "<image>\nwhat is it ?"},
                                      {"from": "gpt", "value": "red"}]})
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(records))
    return str(path)


def base_args(assets) -> list[str]:
    return ["--model", assets["model"], "--data", assets["test"], "--image-folder", assets["images"],
            "--layer", "1", "--max-new-tokens", "1"]


def refused(capsys, argv) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("extra, match", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--limit", "0"], "--limit must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--keep", "17"], "--keep must be in [1, 16] (the model's visual tokens per image), got [17]"),
    (["--keep", "8", "600"], "--keep must be in [1, 16]"),
    (["--keep", "8", "--layer", "2"], "--layer must be in [0, 1]"),
    (["--method", "fastv", "nope"], "--method must be among"),
    (["--max-skip-fraction", "-1"], "--max-skip-fraction must be in [0, 1]"),
    (["--device", "gpu0"], "--device: "),
])
def test_bad_arguments(assets, capsys, extra, match):
    assert match in refused(capsys, base_args(assets) + extra)


def test_missing_paths(assets, tmp_path, capsys):
    argv = base_args(assets)
    argv[argv.index("--model") + 1] = str(tmp_path / "missing")
    assert refused(capsys, argv).startswith("error: --model")
    argv = base_args(assets)
    argv[argv.index("--data") + 1] = str(tmp_path / "missing.json")
    assert refused(capsys, argv).startswith("error: --data")


def test_too_many_bad_records_stop_with_the_training_policy(assets, mixed_data, capsys):
    argv = base_args(assets)
    argv[argv.index("--data") + 1] = mixed_data
    line = refused(capsys, argv)
    assert "2 of 18 evaluation records skipped (missing_image: 1, no_answer: 1)" in line
    assert "--max-skip-fraction 0.01" in line


def test_bad_records_are_skipped_and_counted(assets, mixed_data, capsys):
    argv = base_args(assets) + ["--max-skip-fraction", "0.2", "--limit", "2"]
    argv[argv.index("--data") + 1] = mixed_data
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped records: missing_image: 1, no_answer: 1" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("none", "fastv"))]
    # no --keep: all 16 visual tokens of the tiny model, then 1/3, 2/9, 1/9 of them
    assert [row[2] for row in rows] == ["16", "5", "3", "1"] and all(row[3] == "2" for row in rows)


def test_library_rejects_what_it_cannot_evaluate(assets):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(assets["model"])
    processor = AutoProcessor.from_pretrained(assets["model"])
    items, skipped = collect_items(load_records(assets["test"])[:2], assets["images"])
    assert len(items) == 2 and not skipped
    with pytest.raises(ValueError, match="keep must be in \\[0, 16\\]"):
        evaluate(model, processor, items, [{"method": "fastv", "keep": 600}])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluate(model, processor, items, [{"method": "fastv", "keep": 8}], batch_size=0)


def test_evaluation_after_training_skips_what_training_skipped(assets, mixed_data, tmp_path, capsys):
    """The issue's case: the post-training evaluation of a file holding a record with no answer (which training
    skips as no_labels) used to stop with `needs a human and a gpt turn`."""
    from epic_ext.train.__main__ import run_eval
    from epic_ext.train.config import TrainConfig

    cfg = TrainConfig(model=assets["model"], data=assets["data"], image_folder=assets["images"], layer=1,
                      eval_data=mixed_data, eval_keep=[8], max_skip_fraction=0.2)
    rows = run_eval(cfg, assets["model"])
    assert [row["n"] for row in rows] == [16] * 4
    assert "skipped evaluation records: missing_image: 1, no_answer: 1" in capsys.readouterr().out
