"""LLaVA-OneVision samples (epic_ext.data.chat + onevision_data) on a tiny offline tokenizer, the PIL OneVision
image processor and a tiny LlavaOnevisionForConditionalGeneration: the number of <image> tokens written for each
image is the number of features the model produces for it (anyres crop grids, unpadding, the anyres_max shrink,
newline slots, base crop only in multi-image samples), the answers and their end-of-turn token are the supervised
tokens, and EPIC's loss on a OneVision batch equals the masked eager reference's cross entropy."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from helpers.chat_assets import ONEVISION_CHAT_TEMPLATE, build_tiny_onevision_image_processor  # noqa: E402
from helpers.chat_assets import build_tiny_onevision_tokenizer  # noqa: E402

from epic_ext.data.chat import ChatDataset, ChatProcessor  # noqa: E402
from epic_ext.data.video import VIDEO_DEFAULTS  # noqa: E402
from epic_ext.models.families import LLAVA_ONEVISION  # noqa: E402
from epic_ext.data.llava import collate  # noqa: E402
from epic_ext.data.onevision import OnevisionLayout  # noqa: E402

WORDS = ("what", "color", "is", "it", "and", "this", "one", "?", "red", "blue", "green", "yes", "no", "left", "right")
# (width, height): one grid crop, 1x2 / 2x1 / 2x2 grids, unpadded rows (wide) and columns (tall), odd sizes
SIZES = {"c28.png": (28, 28), "w50.png": (50, 40), "w100.png": (100, 20), "t70.png": (20, 70), "s56.png": (56, 56),
         "o33.png": (33, 61), "w90.png": (90, 31)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_onevision_tokenizer(WORDS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for index, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (30 * index, 100, 200 - 20 * index)).save(folder / name)
    return folder


def tiny_model(tokenizer, aspect: str = "anyres_max_9", seed: int = 0, **kwargs):
    from epic_ext.models.tiny import build_tiny_llava_onevision

    model = build_tiny_llava_onevision(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       **kwargs)
    model.config.vision_aspect_ratio = aspect
    return model


# the tiny checkpoints' video processor: the tiny crop, the tiny image processor's normalisation
TINY_VIDEO_SETTINGS = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 28, "width": 28},
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def make_processor(tokenizer, model, tmp_path_factory) -> ChatProcessor:
    return ChatProcessor(tokenizer=tokenizer, image_processor=build_tiny_onevision_image_processor(),
                         chat_template=ONEVISION_CHAT_TEMPLATE, source=str(tmp_path_factory.mktemp("unused")),
                         image_token="<image>", video_token="<video>", videos=True,
                         layout=OnevisionLayout.from_config(model.config),
                         video_config={**VIDEO_DEFAULTS["LlavaOnevisionVideoProcessor"], **TINY_VIDEO_SETTINGS})


def record(sample_id, names, question="what color is it ?", answer="red"):
    return {"id": sample_id, "image": list(names), "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


# single-image samples of every size, two-image samples, a text-only sample
RECORDS = ([record(f"one-{name}", [name]) for name in SIZES]
           + [record("two-a", ["w50.png", "t70.png"]), record("two-b", ["s56.png", "c28.png"]),
              {"id": "text", "conversations": [{"from": "human", "value": "left or right ?"},
                                               {"from": "gpt", "value": "left"}]}])


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])  # max_1: the 2x2 maps shrink (ratio > 1.1)
def test_image_token_counts_are_the_models_features(tokenizer, images, tmp_path_factory, aspect):
    """Per image, the count written equals the length of the model's own packed features for the batch (with
    batch_num_images), and the model's forward takes the batch (it raises when tokens and features differ)."""
    model = tiny_model(tokenizer, aspect)
    processor = make_processor(tokenizer, model, tmp_path_factory)
    dataset = ChatDataset(RECORDS, images, processor, max_length=1024)
    samples = [dataset[i] for i in range(len(RECORDS))]
    written = []
    from PIL import Image

    for item in RECORDS:
        pictures = [Image.open(images / name).convert("RGB") for name in item.get("image", [])]
        written += processor.visual_inputs(pictures)[1]
    batch = collate(samples, tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[:2] == (len(written), 5)  # the 2x2 grid: base + 4 crops, others padded
    assert batch["batch_num_images"].tolist() == [1] * len(SIZES) + [2, 2, 0]
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                  batch_num_images=batch["batch_num_images"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        assert [int(f.shape[0]) for f in features] == written
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
        logits = model(**inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    image_id = processor.image_token_id
    per_sample = (batch["input_ids"] == image_id).sum(1).tolist()
    assert per_sample[:len(SIZES)] == written[:len(SIZES)]
    assert per_sample[-1] == 0 and per_sample[-3] == written[len(SIZES)] + written[len(SIZES) + 1]
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert written[len(SIZES):] == [grid * grid + 1] * 4  # multi-image: base crop + one newline slot each
    assert len(set(written[:len(SIZES)])) >= 4, "the sizes give different counts"


def test_supervised_tokens_are_the_answers_and_their_end_of_turn(tokenizer, images, tmp_path_factory):
    model = tiny_model(tokenizer)
    processor = make_processor(tokenizer, model, tmp_path_factory)
    multi_turn = {"id": "mt", "image": ["c28.png"], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "left or right ?"}, {"from": "gpt", "value": "blue and green"}]}
    sample = ChatDataset([multi_turn], images, processor, max_length=512)[0]
    supervised = [tokenizer.decode([t]) for t, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist())
                  if label != -100]
    assert supervised == ["red", "<|im_end|>", "blue", "and", "green", "<|im_end|>"]
    text = tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|> user <image>") and text.endswith("green <|im_end|>")
    assert "mm_token_type_ids" not in sample  # OneVision's positions are 1-D


def test_parameter_parts_split_onevision(tokenizer):
    from epic_ext.models.families import parameter_parts

    model = tiny_model(tokenizer)
    parts = parameter_parts(model)
    ids = [id(p) for part in parts.values() for p in part]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.model.image_newline for p in parts["projector"])
    assert {id(p) for p in parts["vision"]} == {id(p) for p in model.model.vision_tower.parameters()}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_distillation_rows_match_the_masked_reference(tokenizer, images, tmp_path_factory, padding):
    """EPIC's loss on a OneVision batch (anyres single images, a two-image sample, an image + video sample, text
    only): the student's SFT sum
    equals the cross entropy of the independent masked eager reference (model_reference.EagerReference: the
    unpatched eager model on the full sequence, dropped visual keys hidden from layer K on) at the supervised
    positions; the KL is taken against the teacher's rows of the same positions."""
    from helpers.model_reference import EagerReference

    from epic_ext.distill import DistillConfig, distillation_loss, shifted_targets
    from epic_ext.models import apply_compression
    from epic_ext.schedules import CompressionStep

    model = tiny_model(tokenizer, seed=1)
    processor = make_processor(tokenizer, model, tmp_path_factory)
    records = [record("a", ["w50.png"], answer="blue and green"), record("b", ["w50.png", "t70.png"]),
               {**record("c", ["t70.png"], answer="yes"), "video": ["w50.png", "o33.png"]}, RECORDS[-1]]
    dataset = ChatDataset(records, images, processor, max_length=1024)
    batch = collate([dataset[i] for i in range(len(records))], tokenizer.pad_token_id, padding_side=padding)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    handle = apply_compression(model, "random", layer=2, ratio=0.5, generator=torch.Generator().manual_seed(0))
    step = CompressionStep(progress=0.5, student_ratio=0.5, teacher_ratio=0.2, student_layer=2, teacher_layer=2)
    try:
        with torch.no_grad():
            handle.settings.compressor.generator.manual_seed(5)
            out = distillation_loss(model, handle, batch, step, DistillConfig(lam=0.5, tau=1.0), normalizer=1.0)
            handle.settings.compressor.generator.manual_seed(5)
            with handle.override(ratio=0.5):
                kept = model(**inputs).kept_positions  # the student's kept set, drawn again from the same seed
    finally:
        handle.remove()
    visual = (batch["input_ids"] == processor.image_token_id) | (batch["input_ids"] == processor.video_token_id)
    assert int((batch["input_ids"] == processor.video_token_id).sum()) == 2 * 4 + 1
    kept_visual = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = kept[b][kept[b] >= 0]
        kept_visual[b, positions[visual[b, positions]]] = True
    assert 0 < int(kept_visual.sum()) < int(visual.sum())
    reference = EagerReference(model, inputs, visual).logits(2, kept_visual)
    targets = shifted_targets(batch["labels"])
    rows = targets != -100
    expected = torch.nn.functional.cross_entropy(reference[rows], targets[rows], reduction="sum")
    assert int(out["tokens"]) == int(rows.sum()) == 4 + 2 + 2 + 2  # the answers and their end-of-turn tokens
    torch.testing.assert_close(out["sft_sum"], expected, rtol=1e-5, atol=1e-5)
    assert float(out["kd_sum"]) > 0  # the teacher kept other tokens


def test_processor_whose_grids_differ_from_the_model_is_refused(tokenizer, images, tmp_path_factory):
    from PIL import Image

    model = tiny_model(tokenizer)
    processor = make_processor(tokenizer, model, tmp_path_factory)
    processor.image_processor.image_grid_pinpoints = [[28, 28]]  # the model still reads up to 2x2 grids
    with pytest.raises(ValueError, match="image_grid_pinpoints / size differ from the model config"):
        processor.visual_inputs([Image.open(images / "s56.png").convert("RGB")])


def test_video_tokens_and_frames_are_what_the_model_reads(tokenizer, images, tmp_path_factory):
    """Video records (an image + a video, a video alone, frames of several sizes): each frame is one S x S crop, the
    <video> tokens (frames x ceil(g / 2)^2 pooled + one newline) are what the model's forward fills (it raises
    otherwise); the logits of the video sample depend on its frames; videos of different frame counts in one
    batch are refused."""
    from PIL import Image

    model = tiny_model(tokenizer)
    processor = make_processor(tokenizer, model, tmp_path_factory)
    frames = ["w50.png", "t70.png", "c28.png"]
    records = [{**record("iv", ["w100.png"]), "video": frames},
               {"id": "v", "video": frames[::-1], "conversations": [
                   {"from": "human", "value": "<video>\nwhat color is it ?"}, {"from": "gpt", "value": "no"}]},
               record("i", ["s56.png"])]
    dataset = ChatDataset(records, images, processor, max_length=1024)
    batch = collate([dataset[i] for i in range(3)], tokenizer.pad_token_id)
    assert batch["pixel_values_videos"].shape == (2, 3, 3, 28, 28)
    assert batch["batch_num_images"].tolist() == [1, 0, 1]
    crop = processor.visual_inputs([Image.open(images / "t70.png").convert("RGB")])[0]["pixel_values"][0, 0]
    torch.testing.assert_close(batch["pixel_values_videos"][0, 1], crop)  # a frame is its image's base crop
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    video_tokens = (batch["input_ids"] == processor.video_token_id).sum(1).tolist()
    assert video_tokens == [3 * ((grid + 1) // 2) ** 2 + 1] * 2 + [0]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    with torch.no_grad():
        logits = model(**inputs).logits
        changed = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"].flip(1))
        other = model(**changed).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert not torch.allclose(logits[1], other[1]) and torch.equal(logits[2], other[2])
    short = ChatDataset([{**records[1], "video": frames[:2]}], images, processor, max_length=1024)[0]
    with pytest.raises(ValueError, match=r"videos of one frame count, got videos of \[2, 3\] frames"):
        collate([dataset[1], short], tokenizer.pad_token_id)


def test_from_pretrained_reads_the_layout_and_the_video_normalisation(tokenizer, images, tmp_path):
    """A OneVision checkpoint directory gives the model's layout and token strings. Its video processor's settings
    lay the frames out: without a video_preprocessor_config.json they are the image processor's (transformers builds
    the video processor from preprocessor_config.json then); with one, its size and mean / std; a size other than
    the model's crop is refused."""
    import json

    from PIL import Image

    model = tiny_model(tokenizer, aspect="anyres_max_4")
    tokenizer.save_pretrained(str(tmp_path))
    build_tiny_onevision_image_processor().save_pretrained(str(tmp_path))  # 28 px, mean = std = 0.5
    model.config.save_pretrained(str(tmp_path))
    frames = [Image.open(images / name).convert("RGB") for name in ("w50.png", "t70.png")]
    loaded = LLAVA_ONEVISION.load_processor(str(tmp_path), "fallback")
    assert loaded.layout == OnevisionLayout.from_config(model.config) and loaded.layout.max_crops == 4
    assert (loaded.image_token, loaded.video_token, loaded.video_config["size"], loaded.video_config["image_mean"]) == (
        "<image>", "<video>", {"height": 28, "width": 28}, [0.5, 0.5, 0.5])
    as_images = loaded.video_inputs(frames)[0]["pixel_values_videos"]
    video_file = tmp_path / "video_preprocessor_config.json"
    video_file.write_text(json.dumps({**TINY_VIDEO_SETTINGS, "image_mean": [0, 0, 0], "image_std": [1, 1, 1]}))
    loaded = LLAVA_ONEVISION.load_processor(str(tmp_path), "fallback")
    assert (loaded.video_config["image_mean"], loaded.video_config["image_std"]) == ([0.0] * 3, [1.0] * 3)
    rescaled = loaded.video_inputs(frames)[0]["pixel_values_videos"]
    torch.testing.assert_close(rescaled, as_images * 0.5 + 0.5, rtol=1e-5, atol=1e-5)
    video_file.write_text(json.dumps({"video_processor_type": "LlavaOnevisionVideoProcessor"}))  # 384 px default
    with pytest.raises(ValueError, match="384.*crop"):
        LLAVA_ONEVISION.load_processor(str(tmp_path), "fallback").video_inputs(frames)
