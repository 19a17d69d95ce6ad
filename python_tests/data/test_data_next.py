"""LLaVA-NeXT samples (epic_ext.data.llava.LlavaDataset with a LlavaNextProcessor) on a tiny offline tokenizer, the PIL
NeXT image processor and a tiny LlavaNextForConditionalGeneration: input_ids, pixel_values (anyres crops) and
image_sizes equal what the processor's own __call__ gives for the same prompt; the number of <image> tokens written
for each image is the number of features the model makes of it (base crop, unpadded grid, newline slots); a batch of
mixed sizes (crops padded) goes through the model; the supervised tokens are the answers and their </s>; EPIC's loss
on a NeXT batch equals the masked eager reference's cross entropy; parameter_parts puts image_newline with the
projector."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers.next_assets import build_tiny_next_model, build_tiny_next_processor  # noqa: E402

from epic_ext.data.llava import LlavaDataset, collate  # noqa: E402
from epic_ext.data.records import IGNORE_INDEX  # noqa: E402

WORDS = ("what", "color", "is", "it", "and", "this", "one", "?", "red", "blue", "green", "yes", "no", "left", "right")
# (width, height): 1x1 grid, 2x2, wide 1x2 (unpadded rows), tall 2x1 (unpadded columns), very wide, odd sizes
SIZES = {"c28.png": (28, 28), "s56.png": (56, 56), "w50.png": (50, 40), "t30.png": (30, 61), "w100.png": (100, 20),
         "o33.png": (33, 47), "w90.png": (90, 31)}


@pytest.fixture(scope="module")
def processor():
    return build_tiny_next_processor(WORDS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Random-noise images (fresh pixels per size, fixed seed)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    for name, (width, height) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    return folder


def record(sample_id, names, question="what color is it ?", answer="red", turns=None):
    conversations = turns or [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "image": list(names), "conversations": conversations}


RECORDS = ([record(f"one-{name}", [name]) for name in SIZES]
           + [record("two", ["w50.png", "t30.png"], question="<image>\nthis one and <image>\nthis one ?",
                     answer="left"),
              record("multi-turn", ["w100.png"], turns=[
                  {"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": "red"},
                  {"from": "human", "value": "left or right ?"}, {"from": "gpt", "value": "blue and green"}]),
              {"id": "text", "conversations": [{"from": "human", "value": "left or right ?"},
                                               {"from": "gpt", "value": "left"}]}])


def prompt_text(item) -> str:
    """The llava-1.5 / NeXT-Vicuna prompt, written here from the format (placeholders first when the record has
    none), for the processor's own __call__."""
    turns = [dict(turn) for turn in item["conversations"]]
    n_images = len(item.get("image", []))
    if n_images and not any("<image>" in turn["value"] for turn in turns):
        turns[0]["value"] = "<image>\n" * n_images + turns[0]["value"]
    return "".join(f"USER: {turn['value']} ASSISTANT:" if turn["from"] == "human" else f" {turn['value']}</s>"
                   for turn in turns)


@pytest.mark.parametrize("do_pad", [True, False])
def test_samples_equal_the_processors_own_call(processor, images, do_pad, monkeypatch):
    """Per record: input_ids equal processor(text=prompt, images=...)'s (the processor counts the <image> tokens
    of each image from its size), pixel_values [n, crops, 3, 28, 28] and image_sizes equal its; the supervised
    tokens are the answers and their </s>. An image processor saved with do_pad false gives the same samples: the
    processor's __call__ asks for padded crops whatever the setting."""
    from PIL import Image

    monkeypatch.setattr(processor.image_processor, "do_pad", do_pad)
    dataset = LlavaDataset(RECORDS, images, processor, max_length=1024)
    tokenizer = processor.tokenizer
    counts = set()
    for index, item in enumerate(RECORDS):
        sample = dataset[index]
        pictures = [Image.open(images / name).convert("RGB") for name in item.get("image", [])]
        expected = processor(text=[prompt_text(item)], images=pictures or None, return_tensors="pt")
        assert sample["input_ids"].tolist() == expected["input_ids"][0].tolist(), item["id"]
        if pictures:
            assert torch.equal(sample["pixel_values"], expected["pixel_values"].to(torch.float32)), item["id"]
            assert sample["image_sizes"].tolist() == expected["image_sizes"].tolist()
            assert sample["image_sizes"].tolist() == [[p.height, p.width] for p in pictures]
            counts.add(int((sample["input_ids"] == processor.image_token_id).sum()))
        else:
            assert sample["pixel_values"] is None and "image_sizes" not in sample
        answers = [turn["value"] for turn in item["conversations"] if turn["from"] == "gpt"]
        supervised = [tokenizer.convert_ids_to_tokens(int(token)) for token, label
                      in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
        assert supervised == [word for answer in answers for word in [*answer.split(), "</s>"]], item["id"]
        assert (sample["labels"] != IGNORE_INDEX).sum() == len(supervised)
    assert len(counts) >= 5, f"the sizes give different counts: {counts}"


@pytest.mark.parametrize("padding", ["left", "right"])
def test_image_token_counts_are_the_models_features(processor, images, padding):
    """The count written for each image equals the length of the model's own packed features of it (its anyres
    unpadding and newline slots), and the model's forward takes the batch of mixed sizes, crops padded to the most
    (it raises when tokens and features differ); the logits of a sample do not depend on its batch mates."""
    model = build_tiny_next_model(processor.tokenizer)
    dataset = LlavaDataset(RECORDS, images, processor, max_length=1024)
    samples = [dataset[i] for i in range(len(RECORDS))]
    batch = collate(samples, processor.tokenizer.pad_token_id, padding_side=padding)
    n_images = sum(len(item.get("image", [])) for item in RECORDS)
    assert batch["pixel_values"].shape == (n_images, 5, 3, 28, 28)  # the 2x2 grid: base + 4 crops, others padded
    assert batch["image_sizes"].shape == (n_images, 2)
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        written = [int((sample["input_ids"] == processor.image_token_id).sum()) for sample in samples]
        per_image = [int(f.shape[0]) for f in features]
        image_owner = [b for b, item in enumerate(RECORDS) for _ in item.get("image", [])]
        assert [sum(n for n, owner in zip(per_image, image_owner) if owner == b) for b in range(len(RECORDS))] \
            == written
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
        logits = model(**inputs).logits
        alone = collate([samples[1]], processor.tokenizer.pad_token_id)
        single = model(**{k: v for k, v in alone.items() if k not in ("labels", "ids")}).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    real = batch["attention_mask"][1].bool()
    torch.testing.assert_close(logits[1][real], single[0], rtol=1e-4, atol=1e-4)


def test_parameter_parts_split_next(processor):
    from epic_ext.models.families import parameter_parts

    model = build_tiny_next_model(processor.tokenizer)
    parts = parameter_parts(model)
    ids = [id(p) for part in parts.values() for p in part]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.model.image_newline for p in parts["projector"])
    assert {id(p) for p in parts["projector"]} == {id(p) for p in [*model.model.multi_modal_projector.parameters(),
                                                                   model.model.image_newline]}
    assert {id(p) for p in parts["vision"]} == {id(p) for p in model.model.vision_tower.parameters()}
    assert {id(p) for p in parts["llm"]} == {id(p) for p in [*model.model.language_model.parameters(),
                                                             *model.lm_head.parameters()]}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_distillation_rows_match_the_masked_reference(processor, images, padding):
    """EPIC's loss on a NeXT batch (anyres images of several sizes, a two-image sample, a multi-turn sample, text
    only): the student's SFT sum equals the cross entropy of the independent masked eager reference
    (model_reference.EagerReference: the unpatched eager model on the full sequence, dropped visual keys hidden from
    layer K on) at the supervised positions; the KL is taken against the teacher's rows of the same positions."""
    from helpers.model_reference import EagerReference

    from epic_ext.distill import DistillConfig, distillation_loss, shifted_targets
    from epic_ext.models import apply_compression
    from epic_ext.schedules import CompressionStep

    model = build_tiny_next_model(processor.tokenizer, seed=1)
    records = [record("a", ["w50.png"], answer="blue and green"), RECORDS[len(SIZES)], RECORDS[len(SIZES) + 1],
               record("b", ["s56.png"]), RECORDS[-1]]
    dataset = LlavaDataset(records, images, processor, max_length=1024)
    batch = collate([dataset[i] for i in range(len(records))], processor.tokenizer.pad_token_id, padding_side=padding)
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
    visual = batch["input_ids"] == processor.image_token_id
    kept_visual = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = kept[b][kept[b] >= 0]
        kept_visual[b, positions[visual[b, positions]]] = True
    assert 0 < int(kept_visual.sum()) < int(visual.sum())
    reference = EagerReference(model, inputs, visual).logits(2, kept_visual)
    targets = shifted_targets(batch["labels"])
    rows = targets != -100
    expected = torch.nn.functional.cross_entropy(reference[rows], targets[rows], reduction="sum")
    assert int(out["tokens"]) == int(rows.sum()) == 4 + 2 + (2 + 4) + 2 + 2  # the answers and their </s>
    torch.testing.assert_close(out["sft_sum"], expected, rtol=1e-5, atol=1e-5)
    assert float(out["kd_sum"]) > 0  # the teacher kept other tokens


def test_next_family_is_trainable_with_the_llava_dataset(processor, images, tmp_path):
    """The family's processor factory on a saved checkpoint gives the LlavaNextProcessor (PIL backend without
    torchvision), and the family's dataset is LlavaDataset with image_sizes."""
    from epic_ext.models.families import FAMILIES, TRAINABLE, family_of_checkpoint

    model = build_tiny_next_model(processor.tokenizer)
    model.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    family = family_of_checkpoint(str(tmp_path))
    assert family is FAMILIES["llava_next"] and "llava_next" in TRAINABLE
    loaded = family.load_processor(str(tmp_path))
    assert type(loaded).__name__ == "LlavaNextProcessor"
    dataset = family.dataset(RECORDS[:2], images, loaded, max_length=1024)
    assert isinstance(dataset, LlavaDataset)
    reference = LlavaDataset(RECORDS[:2], images, processor, max_length=1024)
    for index in range(2):
        ours, theirs = dataset[index], reference[index]
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist()
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
