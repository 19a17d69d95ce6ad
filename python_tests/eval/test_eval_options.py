"""`python -m epic_ext.eval` options: --attn-implementation (eager and SDPA answer alike; flash_attention_2 without
flash-attn is one line before any model loads), --ratio (the fraction of each sample's visual tokens removed, instead
of --keep) and video records (a tiny Qwen2.5-VL checkpoint on generated frames: batched answers equal per-sample
answers and a direct model.generate on the same inputs). Also the same attention checks in `python -m
epic_ext.efficiency --measure` and the lmms-eval plugin's model arguments."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import types

import pytest
import torch
from helpers.chat_assets import make_qwen_train_assets

pytest.importorskip("transformers")

from epic_ext.eval import check_video_frames, collect_items, main  # noqa: E402
from epic_ext.cli import UsageError  # noqa: E402
from epic_ext.models import _hf, apply_compression  # noqa: E402
from epic_ext.models.families import FAMILIES, Family  # noqa: E402

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
LAYER = 1
LLAVA_LAYER = 2


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The demo model (a trained tiny LLaVA-1.5, 16 visual tokens per image: its answers change with compression)
    and 16 shapes records at its image size and grid."""
    from epic_ext.demo import DEMO_MODEL_DIR  # noqa: PLC0415
    from epic_ext.demo.task import make_shapes_task  # noqa: PLC0415

    root = tmp_path_factory.mktemp("eval_options_llava")
    splits = make_shapes_task(root / "data", n_train=0, n_val=0, n_test=16, seed=5, image_size=56, grid=4)
    return {"model": str(DEMO_MODEL_DIR), "test": splits["test"], "images": str(root / "data")}


def _frames(folder: pathlib.Path, count: int, size: int, seed: int) -> list[str]:
    """PNG frames of a square moving across a noisy background; names relative to folder.parent."""
    from PIL import Image  # noqa: PLC0415

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    names = []
    for index in range(count):
        pixels = torch.randint(0, 60, (size, size, 3), generator=generator, dtype=torch.uint8)
        start = 4 + 6 * index
        pixels[10:24, start:start + 14] = torch.tensor([200, 40, 40], dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
        names.append(f"{folder.name}/{index}.png")
    return names


def _qwen_assets(root: pathlib.Path, family: str) -> dict:
    """The tiny `family` checkpoint and a QA file of 4 image records and 3 video records (4 frames with a
    placeholder and an fps; 3 frames, odd, without a placeholder; 6 frames of another size)."""
    assets = make_qwen_train_assets(root, family)
    folder = pathlib.Path(assets["images"])
    records = json.loads(pathlib.Path(assets["test"]).read_text())[:4]
    records += [
        {"id": "clip-a", "video": _frames(folder / "clip_a", 4, 56, seed=1), "fps": 1.0,
         "conversations": [{"from": "human", "value": "<video>\nwhat shape is red ?"},
                           {"from": "gpt", "value": "square"}]},
        {"id": "clip-b", "video": _frames(folder / "clip_b", 3, 56, seed=2),
         "conversations": [{"from": "human", "value": "what colour is the square ?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "clip-c", "video": _frames(folder / "clip_c", 6, 84, seed=3),
         "conversations": [{"from": "human", "value": "<video>\nhow many shapes ?"}, {"from": "gpt", "value": "one"}]},
    ]
    data = root / "mixed.json"
    data.write_text(json.dumps(records))
    return {**assets, "mixed": str(data), "records": records}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _qwen_assets(tmp_path_factory.mktemp("eval_options_qwen"), "qwen2_5_vl")


def rows_of(tmp_path, capsys, argv, name="rows.json") -> tuple[dict, str]:
    output = tmp_path / name
    assert main([*argv, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    return {(row["method"], row["ratio"], row["keep"]): row for row in json.loads(output.read_text())}, printed


def refused(capsys, argv) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Family, "load_model", refuse)


@pytest.fixture
def loaded(monkeypatch):
    """The models `Family.load_model` returned in this test."""
    models = []
    original = Family.load_model

    def record(self, *args, **kwargs):
        models.append(original(self, *args, **kwargs))
        return models[-1]

    monkeypatch.setattr(Family, "load_model", record)
    return models


def llava_args(llava) -> list[str]:
    return ["--model", llava["model"], "--data", llava["test"], "--image-folder", llava["images"], "--layer",
            str(LLAVA_LAYER), "--max-new-tokens", "3", "--device", "cpu"]


# --------------------------------------------------------------------------------------------------- attention --
def test_eager_and_sdpa_give_the_same_answers(llava, tmp_path, capsys, loaded):
    results = {}
    for attn in ("eager", "sdpa"):
        rows, _ = rows_of(tmp_path, capsys, [*llava_args(llava), "--keep", "16", "4", "--method", "fastv", "dart",
                                             "--attn-implementation", attn], f"{attn}.json")
        assert rows["fastv", None, 4]["predictions"] != rows["none", None, 16]["predictions"]
        text_config = loaded[-1].model.language_model.config
        assert _hf.text_attention_implementation(text_config) == attn  # what the loaded model ran
        results[attn] = rows
    assert results["eager"].keys() == results["sdpa"].keys() and len(results["eager"]) == 3
    for key, row in results["sdpa"].items():
        assert results["eager"][key]["predictions"] == row["predictions"], key


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here")
def test_flash_without_flash_attn_is_one_line_before_the_model_loads(llava, capsys, no_model_load):
    err = refused(capsys, [*llava_args(llava), "--attn-implementation", "flash_attention_2"])
    assert err.startswith("error: --attn-implementation flash_attention_2 needs the flash-attn package"), err


def test_flash_on_the_cpu_is_one_line(llava, capsys, no_model_load, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # importable, no GPU
    err = refused(capsys, [*llava_args(llava), "--attn-implementation", "flash_attention_2"])
    assert err == "error: --attn-implementation flash_attention_2 runs on CUDA devices only, not cpu", err


def test_flash_in_fp32_is_one_line(llava, capsys, no_model_load, monkeypatch):
    """flash-attn's kernels take fp16 / bf16 only (transformers hands them an fp32 model's fp32 queries)."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the checks can tell
    argv = [*llava_args(llava)[:-2], "--device", "cuda", "--attn-implementation", "flash_attention_2"]
    err = refused(capsys, argv)
    assert err == ("error: --attn-implementation flash_attention_2 runs in float16 or bfloat16 only, not float32: "
                   "give --dtype bf16 or fp16"), err


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here")
def test_efficiency_measure_refuses_flash_before_building(capsys, monkeypatch):
    from epic_ext import efficiency  # noqa: PLC0415

    monkeypatch.setattr(efficiency, "build_random_llava", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        efficiency.main(["--measure", "--tiny", "--device", "cpu", "--attn-implementation", "flash_attention_2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "error: --attn-implementation flash_attention_2 needs the flash-attn package" in err, err


def test_efficiency_measure_runs_the_attention_asked_for(capsys, monkeypatch):
    from epic_ext import efficiency  # noqa: PLC0415

    built = []
    original = efficiency.build_random_llava
    monkeypatch.setattr(efficiency, "build_random_llava", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    assert efficiency.main(["--measure", "--tiny", "--layers", "2", "--layer", "1", "--device", "cpu", "--dtype", "fp32", "--keep",
                            "576", "64", "--repeats", "1", "--decode-tokens", "1", "--attn-implementation",
                            "eager"]) == 0
    assert "(eager attention)" in capsys.readouterr().out
    assert _hf.text_attention_implementation(built[0].model.language_model.config) == "eager"
    assert built[0].config.vision_config._attn_implementation == "sdpa"


def test_lmms_plugin_checks_attention_like_the_clis(llava, monkeypatch):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install '.[eval]')")
    from epic_ext.lmms_eval_plugin import ModelArgumentError, parse_model_args  # noqa: PLC0415

    with pytest.raises(ModelArgumentError, match="attn_implementation must be one of eager, sdpa, "
                                                 "flash_attention_2, got 'flex'"):
        parse_model_args(pretrained=llava["model"], attn_implementation="flex", device="cpu")
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    with pytest.raises(ModelArgumentError) as error:
        parse_model_args(pretrained=llava["model"], attn_implementation="flash_attention_2", device="cpu")
    assert str(error.value) == ("epic_ext model_args: attn_implementation=flash_attention_2 runs on CUDA devices "
                                "only, not cpu")
    settings, _, _ = parse_model_args(pretrained=llava["model"], attn_implementation="eager", device="cpu")
    assert settings.attn_implementation == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelArgumentError) as error:
        parse_model_args(pretrained=llava["model"], attn_implementation="flash_attention_2", device="cuda",
                         dtype="fp32")
    assert str(error.value) == ("epic_ext model_args: attn_implementation=flash_attention_2 runs in float16 or "
                                "bfloat16 only, not float32")
    settings, _, _ = parse_model_args(pretrained=llava["model"], attn_implementation="flash_attention_2",
                                      device="cuda", dtype="bf16")  # what a GPU machine with flash-attn accepts
    assert settings.attn_implementation == "flash_attention_2"


# ------------------------------------------------------------------------------------------------------- ratio --
def test_ratio_on_llava_equals_the_same_keep(llava, tmp_path, capsys):
    """16 visual tokens per image: --ratio 0.75 removes 12, as --keep 4 does (and not as --keep 12, whose answers
    differ); the table says the ratio."""
    by_ratio, printed = rows_of(tmp_path, capsys, [*llava_args(llava), "--ratio", "0", "0.75"], "ratio.json")
    by_keep, _ = rows_of(tmp_path, capsys, [*llava_args(llava), "--keep", "16", "12", "4"], "keep.json")
    assert sorted(by_ratio) == [("fastv", 0.75, 4), ("none", 0.0, 16)]
    assert by_ratio["fastv", 0.75, 4]["predictions"] == by_keep["fastv", None, 4]["predictions"]
    assert by_keep["fastv", None, 4]["predictions"] != by_keep["fastv", None, 12]["predictions"]
    assert by_ratio["fastv", 0.75, 4]["predictions"] != by_ratio["none", 0.0, 16]["predictions"]
    assert by_ratio["none", 0.0, 16]["predictions"] == by_keep["none", None, 16]["predictions"]
    assert by_ratio["fastv", 0.75, 4]["kv_mb"] == by_keep["fastv", None, 4]["kv_mb"]
    header, _, first, second = printed.strip().splitlines()[-4:]
    assert header.split()[:4] == ["method", "layer", "ratio", "keep"]
    assert first.split()[:4] == ["none", "-", "0", "16"]
    assert second.split()[:4] == ["fastv", str(LLAVA_LAYER), "0.75", "4"]


@pytest.mark.parametrize("extra, match", [
    (["--ratio", "0.5", "--keep", "4"], "argument --keep: not allowed with argument --ratio"),
    (["--ratio", "0.5", "1.0"], "error: --ratio values must be in [0, 1) (the fraction of visual tokens removed), got "
                                "[1.0]"),
    (["--ratio", "-0.1"], "--ratio values must be in [0, 1)"),
    (["--ratio", "0.5", "--layer", "99"], "--layer must be in [0, "),
])
def test_bad_ratios_are_one_line(llava, capsys, no_model_load, extra, match):
    argv = [*llava_args(llava), *extra]
    if "--layer" in extra:
        argv = argv[:argv.index("--layer")] + argv[argv.index("--layer") + 2:]
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        status = exit_info.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and match in err, err


def test_dynamic_family_needs_keep_or_ratio(qwen, capsys, no_model_load):
    err = refused(capsys, ["--model", qwen["model"], "--data", qwen["mixed"], "--image-folder", qwen["images"]])
    assert err.startswith("error: --keep or --ratio is required for a qwen2_5_vl model"), err


# ------------------------------------------------------------------------------------------------------ videos --
def _direct_inputs(processor, record, folder) -> dict:
    """The generation inputs of one record, built straight from it: ChatProcessor.prompt_batch on its first question,
    its images and its frames (in the record's order, at its fps, else 2)."""
    from PIL import Image  # noqa: PLC0415

    question = record["conversations"][0]["value"]
    images = [Image.open(folder / name).convert("RGB") for name in
              ([record["image"]] if isinstance(record.get("image"), str) else record.get("image") or [])]
    if images and "<image>" not in question:
        question = "<image>\n" + question
    video = ([Image.open(folder / name).convert("RGB") for name in record["video"]], record.get("fps", 2.0)) \
        if record.get("video") else None
    batch = processor.prompt_batch([[{"from": "human", "value": question}]], [images], videos=[video])
    return {k: v for k, v in batch.items() if k not in ("labels", "ids") and v is not None}


def _direct_answers(model, processor, records, folder, max_new_tokens, keeps=None) -> list[str]:
    """Each record alone (_direct_inputs), model.generate (greedy), the answer up to the first end-of-sequence token;
    with `keeps`, compressed by FastV keeping keeps[i] tokens."""
    answers = []
    for index, record in enumerate(records):
        inputs = _direct_inputs(processor, record, folder)
        handle = apply_compression(model, "fastv", layer=LAYER, keep=keeps[index]) if keeps else None
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=processor.tokenizer.pad_token_id,
                                     eos_token_id=processor.tokenizer.eos_token_id)
        finally:
            if handle is not None:
                handle.remove()
        row = out[0, inputs["input_ids"].shape[1]:].tolist()
        if processor.tokenizer.eos_token_id in row:
            row = row[: row.index(processor.tokenizer.eos_token_id)]
        answers.append(processor.tokenizer.decode(row, skip_special_tokens=True))
    return answers


def test_video_records_batched_equal_single_and_direct_generate(qwen, tmp_path, capsys):
    argv = ["--model", qwen["model"], "--data", qwen["mixed"], "--image-folder", qwen["images"], "--ratio", "0.5",
            "--layer", str(LAYER), "--max-new-tokens", "4", "--device", "cpu"]
    batched, printed = rows_of(tmp_path, capsys, [*argv, "--batch-size", "7"], "batched.json")
    single, _ = rows_of(tmp_path, capsys, [*argv, "--batch-size", "1"], "single.json")
    assert "skipped" not in printed
    assert batched.keys() == single.keys() and [key[:2] for key in sorted(batched)] == [("fastv", 0.5),
                                                                                          ("none", 0.0)]
    for key in batched:
        assert batched[key]["n"] == 7  # the 3 video records evaluated
        assert batched[key]["predictions"] == single[key]["predictions"], key
    family = FAMILIES["qwen2_5_vl"]
    model = family.load_model(qwen["model"], torch.float32).eval()
    processor = family.load_processor(qwen["model"])
    folder = pathlib.Path(qwen["images"])
    none = next(row for key, row in batched.items() if key[0] == "none")
    fastv = next(row for key, row in batched.items() if key[0] == "fastv")
    assert none["predictions"] == _direct_answers(model, processor, qwen["records"], folder, 4)
    # the ratio is per sample: 84-px images have 9 visual tokens (5 kept at 0.5); the videos 4 x 4 patches per frame
    # merged 2 x 2 (4 tokens) per 2 frames: 4 frames -> 8 (4 kept), 3 -> 8 (4), 84-px 6 frames -> 27 (14)
    keeps = [5, 5, 5, 5, 4, 4, 14]
    assert fastv["predictions"] == _direct_answers(model, processor, qwen["records"], folder, 4, keeps=keeps)
    assert any(a != b for a, b in zip(fastv["predictions"], none["predictions"])), "compression changed an answer"


def test_eval_inputs_of_video_records_equal_the_direct_inputs(qwen):
    """What eval feeds the model for a record (frames in order, the record's fps in second_per_grid_ts, the video
    placeholder where it stands or added): the tiny model's answers barely depend on these, its inputs do."""
    from epic_ext.eval import prompt_inputs  # noqa: PLC0415

    processor = FAMILIES["qwen2_5_vl"].load_processor(qwen["model"])
    items, _ = collect_items(qwen["records"], qwen["images"], videos=True)
    for item, record in zip(items, qwen["records"]):
        got = prompt_inputs(processor, [item])
        want = _direct_inputs(processor, record, pathlib.Path(qwen["images"]))
        assert got.keys() == want.keys(), record["id"]
        for key in want:
            assert torch.equal(got[key], want[key]), (record["id"], key)
    assert [float(t) for t in prompt_inputs(processor, items[4:])["second_per_grid_ts"]] == [2.0, 1.0, 1.0]


def test_video_records_are_bad_records_for_an_image_only_model(qwen):
    items, skipped = collect_items(qwen["records"], qwen["images"], videos=False)
    assert len(items) == 4 and skipped == {"bad_record": 3}
    items, skipped = collect_items(qwen["records"], qwen["images"], videos=True)
    assert [item.get("fps") for item in items[4:]] == [1.0, None, None] and not skipped
    assert [len(item["video"]) for item in items[4:]] == [4, 3, 6]
    with pytest.raises(ValueError, match="missing"):
        broken = [dict(qwen["records"][4], video=["clip_a/0.png", "clip_a/nope.png"])]
        collect_items(broken, qwen["images"], on_bad_image="error", videos=True)


def test_onevision_refuses_videos_of_different_frame_counts(qwen):
    items, _ = collect_items(qwen["records"], qwen["images"], videos=True)
    check_video_frames(FAMILIES["qwen2_5_vl"], items)  # Qwen batches any frame counts
    with pytest.raises(UsageError, match=r"--data: .* batches videos of one frame count; the video records have "
                                         r"\[3, 4, 6\] frames"):
        check_video_frames(FAMILIES["llava_onevision"], items)


def test_evaluation_after_training_takes_video_records_and_the_attention(qwen, tmp_path, capsys, loaded):
    """`python -m epic_ext.train --eval-data` evaluates the export with the same code: on the Qwen checkpoint its rows
    (3 new tokens, batches of 32) equal `python -m epic_ext.eval`'s at the same setting, videos included, and the
    model it loads runs the run's --attn-implementation."""
    from epic_ext.train.__main__ import run_eval  # noqa: PLC0415
    from epic_ext.train.config import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig(model=qwen["model"], data=qwen["mixed"], image_folder=qwen["images"], eval_data=qwen["mixed"],
                      eval_keep=[4], layer=LAYER, attn_implementation="eager")
    after_training = run_eval(cfg, qwen["model"])
    assert _hf.text_attention_implementation(loaded[-1].model.language_model.config) == "eager"
    capsys.readouterr()
    cli, _ = rows_of(tmp_path, capsys, ["--model", qwen["model"], "--data", qwen["mixed"], "--image-folder",
                                        qwen["images"], "--keep", "4", "--layer", str(LAYER), "--max-new-tokens", "3",
                                        "--device", "cpu", "--method", "fastv", "dart", "random"])
    assert len(after_training) == len(cli) == 4
    for row in after_training:
        assert row["n"] == 7
        assert row["predictions"] == cli[row["method"], None, row["keep"]]["predictions"], row["method"]


def test_qwen3_vl_video_records_batched_equal_single_and_direct_generate(tmp_path_factory, tmp_path, capsys):
    """Qwen3-VL (its video prompts carry per-frame timestamps, from the record's fps): the same checks, with the kept
    counts of --ratio 0.5 worked out from each sample's visual tokens in the direct inputs."""
    assets = _qwen_assets(tmp_path_factory.mktemp("eval_options_qwen3"), "qwen3_vl")
    argv = ["--model", assets["model"], "--data", assets["mixed"], "--image-folder", assets["images"], "--ratio",
            "0.5", "--layer", str(LAYER), "--max-new-tokens", "4", "--device", "cpu"]
    batched, printed = rows_of(tmp_path, capsys, [*argv, "--batch-size", "7"], "batched.json")
    single, _ = rows_of(tmp_path, capsys, [*argv, "--batch-size", "1"], "single.json")
    assert "skipped" not in printed and batched.keys() == single.keys()
    for key in batched:
        assert batched[key]["n"] == 7 and batched[key]["predictions"] == single[key]["predictions"], key
    family = FAMILIES["qwen3_vl"]
    model = family.load_model(assets["model"], torch.float32).eval()
    processor = family.load_processor(assets["model"])
    folder = pathlib.Path(assets["images"])
    visual_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    counts = [int(torch.isin(_direct_inputs(processor, record, folder)["input_ids"], visual_ids).sum())
              for record in assets["records"]]
    assert all(count > 0 for count in counts)
    keeps = [int((1 - 0.5) * count + 0.5) for count in counts]
    none = next(row for key, row in batched.items() if key[0] == "none")
    fastv = next(row for key, row in batched.items() if key[0] == "fastv")
    assert none["predictions"] == _direct_answers(model, processor, assets["records"], folder, 4)
    assert fastv["predictions"] == _direct_answers(model, processor, assets["records"], folder, 4, keeps=keeps)
