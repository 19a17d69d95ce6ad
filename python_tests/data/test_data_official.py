"""The checkpoint's own processor (AutoProcessor: torchvision image backends, the video processors) against
epic_ext's fallback (PIL image backend, the video processors re-implemented in epic_ext.data.video), per family, on
the same records: input ids, labels, attention masks, grids and sizes equal; pixel values within the tolerance of
the two image backends (PIL vs torchvision resampling; measured, docs/models.md). Images of many sizes and aspect
ratios (1x1, tiny, very wide, very tall, beyond the processor's max pixels) and modes (greyscale, RGBA, palette);
videos of several frame counts (odd ones too) and sizes (small to 1920x1080, portrait); checkpoints whose video
settings come from processor_config.json, from their own video_preprocessor_config.json, or (older checkpoints) from
preprocessor_config.json. Planted differences in the fallback (a wrong resample filter, an off-by-one in the grid
rule, a wrong timestamp) must be caught.

Runs where torchvision is importable: the torchvision test stack (`make test-tv`)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from epic_ext.models import _hf  # noqa: E402

if not _hf.torchvision_available():
    pytest.skip("needs an importable torchvision (the torchvision test stack: make test-tv)", allow_module_level=True)

from helpers.official_assets import smooth_image, write_checkpoint  # noqa: E402

from epic_ext.data import video as video_rules  # noqa: E402
from epic_ext.data.llava import collate  # noqa: E402
from epic_ext.models.families import FAMILIES  # noqa: E402

# The two image backends' difference on smooth images, over every case below (measured with torch 2.14.1,
# torchvision 0.29.1, transformers 5.25.0): max |PIL - torchvision| <= 0.031 in normalised units (one or two uint8
# steps after bicubic resampling), mean <= 0.004. Equal where no resize happens.
MAX_PIXEL_DIFF = 0.3
MEAN_PIXEL_DIFF = 0.002
OBSERVED: list = []  # (key, max, mean) of every comparison: the measured tolerance (printed by the last test)
IMAGE_SIZES = [(1, 1), (5, 3), (28, 28), (333, 517), (2000, 10), (10, 1500), (3000, 2000)]
MODES = ["L", "RGBA", "P"]
VIDEO_CASES = [(2, 32, 32), (3, 320, 180), (5, 96, 200), (8, 1920, 1080), (7, 720, 1280)]
CHAT_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]
LAYOUTS = ["processor_config", "separate", "legacy"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    made = {}

    def get(family: str, layout: str = "processor_config") -> str:
        if (family, layout) not in made:
            made[family, layout] = write_checkpoint(root, family, layout)
        return made[family, layout]

    return get


def _records(folder, images=(), frames=(), fps=2.0, question="what is it ?"):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"id": "r", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"},
                                           {"from": "human", "value": "and this ?"},
                                           {"from": "gpt", "value": "a blue square"}]}
    names = []
    for index, image in enumerate(images):
        image.save(folder / f"i{index}.png")
        names.append(f"i{index}.png")
    if names:
        record["image"] = names
    if frames:
        for index, frame in enumerate(frames):
            frame.save(folder / f"f{index}.png")
        record["video"] = [f"f{index}.png" for index in range(len(frames))]
        record["fps"] = fps
    return [record]


def _samples(path, family, records, folder):
    samples = {}
    for backend in ("official", "fallback"):
        processor = FAMILIES[family].load_processor(path, backend)
        dataset = FAMILIES[family].dataset(records, folder, processor, on_bad_image="error", max_length=10**6)
        try:
            samples[backend] = dataset[0]
        except ValueError as error:  # both paths must refuse what the processor refuses
            samples[backend] = error
    return samples


def differences(official, fallback) -> list[str]:
    """What differs between the two paths' samples: any key, shape or integer value; pixel values beyond the
    backends' tolerance."""
    if isinstance(official, Exception) or isinstance(fallback, Exception):
        if type(official) is type(fallback):
            return []
        return [f"official {official!r} vs fallback {fallback!r}"]
    problems = []
    if sorted(official) != sorted(fallback):
        problems.append(f"keys {sorted(official)} vs {sorted(fallback)}")
    for key in sorted(set(official) & set(fallback)):
        a, b = official[key], fallback[key]
        if not torch.is_tensor(a) or not torch.is_tensor(b):
            if a != b:
                problems.append(f"{key}: {a!r} vs {b!r}")
            continue
        if a.shape != b.shape:
            problems.append(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif a.is_floating_point() and key.startswith("pixel_values"):
            diff = (a.double() - b.double()).abs()
            OBSERVED.append((key, float(diff.max()), float(diff.mean())))
            if diff.max() > MAX_PIXEL_DIFF or diff.mean() > MEAN_PIXEL_DIFF:
                problems.append(f"{key}: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}")
        elif a.is_floating_point():
            if not torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6):
                problems.append(f"{key}: {a.tolist()} vs {b.tolist()}")
        elif not torch.equal(a, b):
            problems.append(f"{key}: differ at {int((a != b).sum())} positions")
    return problems


def _batch_differences(path, family, samples):
    """The attention masks and padded batches equal too (both paths' samples through the same collate)."""
    if any(isinstance(sample, Exception) for sample in samples.values()):
        return []
    pad = FAMILIES[family].load_processor(path, "fallback").tokenizer.pad_token_id
    a, b = (collate([samples[k], samples[k]], pad, padding_side="left") for k in ("official", "fallback"))
    return [problem for problem in differences({"attention_mask": a["attention_mask"]},
                                                {"attention_mask": b["attention_mask"]})]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_images_of_many_sizes_equal_the_official_processor(checkpoints, tmp_path, family):
    path = checkpoints(family)
    failures, compared = {}, 0
    cases = [(size, "RGB") for size in IMAGE_SIZES] + [((150, 90), mode) for mode in MODES]
    for index, (size, mode) in enumerate(cases):
        folder = tmp_path / f"case{index}"
        records = _records(folder, images=[smooth_image(*size, seed=index, mode=mode)])
        samples = _samples(path, family, records, folder)
        problems = differences(samples["official"], samples["fallback"]) + _batch_differences(path, family, samples)
        compared += not isinstance(samples["official"], Exception)
        if problems:
            failures[f"{size} {mode}"] = problems
    assert not failures, failures
    assert compared >= len(cases) - 2  # the processors refuse at most the 200:1 extremes, and both paths alike


@pytest.mark.parametrize("family", CHAT_FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_videos_equal_the_official_video_processor(checkpoints, tmp_path, family, layout):
    if family == "llava_onevision" and layout == "legacy":
        pytest.skip("LLaVA-OneVision's video processor has a fixed size: no pixel limits to inherit")
    path = checkpoints(family, layout)
    failures = {}
    for index, (count, width, height) in enumerate(VIDEO_CASES):
        folder = tmp_path / f"case{index}"
        frames = [smooth_image(width, height, seed=100 * index + i) for i in range(count)]
        images = [smooth_image(64, 48, seed=index)] if index % 2 else []
        records = _records(folder, images=images, frames=frames, fps=1.5 + index)
        samples = _samples(path, family, records, folder)
        assert not isinstance(samples["official"], Exception), samples["official"]
        problems = differences(samples["official"], samples["fallback"]) + _batch_differences(path, family, samples)
        if problems:
            failures[f"{count} frames of {width}x{height}"] = problems
    assert not failures, failures


def test_qwen3_vl_video_prompt_carries_the_frame_times(checkpoints, tmp_path):
    path = checkpoints("qwen3_vl")
    frames = [smooth_image(64, 64, seed=i) for i in range(5)]
    records = _records(tmp_path, frames=frames, fps=2.0)
    samples = _samples(path, "qwen3_vl", records, tmp_path)
    tokenizer = FAMILIES["qwen3_vl"].load_processor(path, "fallback").tokenizer
    text = tokenizer.decode(samples["official"]["input_ids"]).replace(" ", "")
    # 5 frames at 2 fps, padded to 6, patches of 2: (0 + 0.5) / 2, (1 + 1.5) / 2, (2 + 2) / 2
    assert [text.count(f"<{t}seconds>") for t in ("0.2", "1.2", "2.0")] == [1, 1, 1]
    assert not differences(samples["official"], samples["fallback"])


def test_the_video_processor_defaults_are_the_classes(checkpoints):
    import transformers as T

    for name, defaults in video_rules.VIDEO_DEFAULTS.items():
        processor = getattr(T, name)()
        for key, value in defaults.items():
            actual = getattr(processor, key)
            actual = dict(actual) if key == "size" else actual
            if key == "size":
                actual = {k: v for k, v in actual.items() if v is not None}
            if isinstance(value, list):
                assert list(actual) == pytest.approx(value), (name, key)
            elif isinstance(value, float):
                assert actual == pytest.approx(value), (name, key)
            else:
                assert actual == value, (name, key, actual)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_llava_processors_pil_backend_equals_torchvision(tmp_path, family):
    """LLaVA-1.5 / NeXT take the checkpoint's AutoProcessor on both paths; the fallback asks for its PIL image
    backend. Same ids and sizes, pixels within the tolerance."""
    import transformers as T

    from helpers.chat_assets import build_tiny_qwen_tokenizer

    tokenizer = build_tiny_qwen_tokenizer(("what", "is", "it", "?"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = None
    if family == "llava":
        processor = T.LlavaProcessor(image_processor=T.CLIPImageProcessor(size={"shortest_edge": 336},
                                                                        crop_size={"height": 336, "width": 336}),
                                     tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1)
    else:
        processor = T.LlavaNextProcessor(image_processor=T.LlavaNextImageProcessor(), tokenizer=tokenizer,
                                         patch_size=14, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1)
    processor.save_pretrained(str(tmp_path / "ckpt"))
    paths = {backend: FAMILIES[family].load_processor(str(tmp_path / "ckpt"), backend)
             for backend in ("official", "fallback")}
    assert "Pil" not in type(paths["official"].image_processor).__name__
    assert "Pil" in type(paths["fallback"].image_processor).__name__
    failures = {}
    for index, size in enumerate([(1, 1), (28, 28), (333, 517), (2000, 10), (10, 1500), (3000, 2000)]):
        image = smooth_image(*size, seed=index)
        outputs = {backend: processor_(text=["<image> what is it ?"], images=[image], return_tensors="pt")
                   for backend, processor_ in paths.items()}
        problems = differences(dict(outputs["official"]), dict(outputs["fallback"]))
        if problems:
            failures[size] = problems
    assert not failures, failures


@pytest.mark.parametrize("plant", ["resample", "grid", "timestamps", "normalisation"])
def test_a_planted_difference_in_the_fallback_is_caught(checkpoints, tmp_path, monkeypatch, plant):
    family = "qwen2_5_vl" if plant != "timestamps" else "qwen3_vl"
    monkeypatch.setattr(sys.modules[__name__], "OBSERVED", [])  # planted differences are not the backends'
    path = checkpoints(family, "separate")
    if plant == "resample":
        original = video_rules.resize_frames
        monkeypatch.setattr(video_rules, "resize_frames",
                            lambda frames, h, w, resample: original(frames, h, w, 2))  # bilinear, not bicubic
    elif plant == "grid":
        original_size = video_rules.qwen_frame_size
        monkeypatch.setattr(video_rules, "qwen_frame_size",
                            lambda *args: (original_size(*args)[0] + 28, original_size(*args)[1]))
    elif plant == "timestamps":
        original_times = video_rules.frame_timestamps
        monkeypatch.setattr(video_rules, "frame_timestamps",
                            lambda frames, fps, temporal: [t + 0.1 for t in original_times(frames, fps, temporal)])
    else:
        original_settings = video_rules.video_settings
        monkeypatch.setattr(video_rules, "video_settings",
                            lambda *args: {**original_settings(*args), "image_mean": [0.5, 0.5, 0.5]})
    import epic_ext.data.chat as chat

    for name in ("resize_frames", "qwen_frame_size", "frame_timestamps", "video_settings"):
        monkeypatch.setattr(chat, name, getattr(video_rules, name))
    frames = [smooth_image(1280, 720, seed=i) for i in range(4)]
    records = _records(tmp_path, frames=frames, fps=2.0)
    samples = _samples(path, family, records, tmp_path)
    assert differences(samples["official"], samples["fallback"]), plant


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_the_tiny_test_checkpoints_give_the_same_samples_on_both_paths(tmp_path, family):
    """The tiny checkpoints the training and evaluation tests use (their own pixel limits, no video config) build
    the same samples through AutoProcessor as through the fallback, video records included: the rest of the suite
    run in the torchvision stack tests the official path on them."""
    from helpers.chat_assets import make_onevision_train_assets, make_qwen_train_assets

    assets = (make_onevision_train_assets(tmp_path) if family == "llava_onevision"
              else make_qwen_train_assets(tmp_path, family))
    records = json.loads(pathlib.Path(assets["data"]).read_text())[:7]
    records[6]["image"] = [records[6]["image"], records[5]["image"]]  # a two-image sample (OneVision: base crops)
    records[6]["conversations"][0]["value"] = "<image>\n" + records[6]["conversations"][0]["value"]
    for index, record in enumerate(records[:3]):
        record["video"] = [records[(index + k) % 6]["image"] for k in range(4)]
        record["conversations"][0]["value"] = "<video>\n" + record["conversations"][0]["value"]
    for index in range(len(records)):
        samples = {}
        for backend in ("official", "fallback"):
            processor = FAMILIES[family].load_processor(assets["model"], backend)
            samples[backend] = FAMILIES[family].dataset(records, assets["images"], processor,
                                                       on_bad_image="error")[index]
        assert not differences(samples["official"], samples["fallback"]), index


def test_the_fallback_says_once_that_it_is_used(checkpoints, caplog):
    import epic_ext.data.chat as chat

    chat._FALLBACK_NOTED.clear()
    path = checkpoints("qwen2_5_vl")
    with caplog.at_level("WARNING", logger="epic_ext.data.chat"):
        FAMILIES["qwen2_5_vl"].load_processor(path, "fallback")
        FAMILIES["qwen2_5_vl"].load_processor(path, "fallback")
        FAMILIES["qwen2_5_vl"].load_processor(path, "official")
    said = [record for record in caplog.records if "fallback" in record.getMessage()]
    assert len(said) == 1
    assert json.loads(json.dumps(said[0].getMessage()))


def test_measured_tolerance_is_within_the_stated_one():
    """Prints the largest differences the comparisons above measured (run with -s to read them)."""
    if not OBSERVED:
        pytest.skip("no comparison ran before this test")
    for key in sorted({k for k, _, _ in OBSERVED}):
        worst_max = max(m for k, m, _ in OBSERVED if k == key)
        worst_mean = max(m for k, _, m in OBSERVED if k == key)
        print(f"{key}: max |PIL - torchvision| {worst_max:.4f}, worst mean {worst_mean:.5f} over "
              f"{sum(k == key for k, _, _ in OBSERVED)} comparisons")
        assert worst_max <= MAX_PIXEL_DIFF and worst_mean <= MEAN_PIXEL_DIFF
