"""epic_ext.data.llava (LLaVA-format records, prompts, label masks, images, batches) and epic_ext.demo.task."""

from __future__ import annotations

import filecmp
import json
import logging
import os

import pytest
import torch

from epic_ext.data.llava import LLAVA_BACKGROUND, LlavaCollator, LlavaDataset, collate, expand_to_square
from epic_ext.data.records import IGNORE_INDEX, ImageLoadError, load_records
from epic_ext.demo.task import build_tiny_processor, demo_vocabulary, make_shapes_task

Image = pytest.importorskip("PIL.Image")

TOKENS_PER_IMAGE = 16  # (56 / 14)^2
EXTRA_WORDS = ["hello", "describe", "it", "cat", "dog", "and", "then", "sat", "on", "mat", "first", "second"]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(demo_vocabulary() + EXTRA_WORDS)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (56, 56), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (40, 70), (20, 200, 40)).save(folder / "green_tall.png")
    Image.new("RGB", (56, 28), (220, 40, 40)).save(folder / "red_wide.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG this is not an image at all" * 4)
    return folder


def _record(conversations, image=None, record_id="s0"):
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(conversations)]
    record = {"id": record_id, "conversations": turns}
    if image is not None:
        record["image"] = image
    return record


def _supervised_text(processor, sample):
    """The supervised tokens, decoded as one run per contiguous span."""
    labels = sample["labels"]
    assert torch.equal(labels[labels != IGNORE_INDEX], sample["input_ids"][labels != IGNORE_INDEX])
    spans, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(processor.tokenizer.convert_ids_to_tokens(token))
        elif current:
            spans.append(" ".join(current))
            current = []
    if current:
        spans.append(" ".join(current))
    return spans


def test_multi_turn_label_mask(processor, image_folder):
    record = _record(["<image>\ndescribe it .", "a red square", "and then ?", "yes", "how many cats ?", "zero"],
                     image="red.png")
    sample = LlavaDataset([record], image_folder, processor)[0]
    assert _supervised_text(processor, sample) == ["a red square </s>", "yes </s>", "zero </s>"]
    tokens = processor.tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist())
    assert tokens[0] == "<s>"
    assert tokens[1:3] == ["user", ":"]
    assert tokens.count("user") == 3 and tokens.count("assistant") == 3 and tokens.count("</s>") == 3
    # the full prompt is llava-1.5-hf's, and input_ids equal what LlavaProcessor produces for it
    prompt = ("USER: <image>\ndescribe it . ASSISTANT: a red square</s>USER: and then ? ASSISTANT: yes</s>"
              "USER: how many cats ? ASSISTANT: zero</s>")
    reference = processor(text=[prompt], images=[Image.open(image_folder / "red.png")], return_tensors="pt")
    assert torch.equal(reference["input_ids"][0], sample["input_ids"])
    assert torch.equal(reference["pixel_values"], sample["pixel_values"])


def test_image_tokens_per_image_and_placeholder_prepended(processor, image_folder):
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == len(processor.tokenizer) - 1
    with_placeholder = LlavaDataset([_record(["<image>\nhello", "cat"], image="red.png")], image_folder, processor)[0]
    without = LlavaDataset([_record(["hello", "cat"], image="red.png")], image_folder, processor)[0]
    assert torch.equal(with_placeholder["input_ids"], without["input_ids"])
    ids = without["input_ids"].tolist()
    first = ids.index(image_id)
    assert ids[first:first + TOKENS_PER_IMAGE] == [image_id] * TOKENS_PER_IMAGE
    assert ids.count(image_id) == TOKENS_PER_IMAGE
    assert without["pixel_values"].shape == (1, 3, 56, 56) and without["pixel_values"].dtype == torch.float32
    assert (without["labels"][without["input_ids"] == image_id] == IGNORE_INDEX).all()


def test_text_only_sample(processor):
    sample = LlavaDataset([_record(["hello", "a cat"])], None, processor)[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert sample["pixel_values"] is None
    assert not (sample["input_ids"] == image_id).any()
    assert _supervised_text(processor, sample) == ["a cat </s>"]
    assert sample["id"] == "s0"


def test_several_images(processor, image_folder):
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    placed = _record(["first <image> second <image> ?", "dog"], image=["red.png", "green_tall.png"])
    sample = LlavaDataset([placed], image_folder, processor)[0]
    ids = sample["input_ids"].tolist()
    assert ids.count(image_id) == 2 * TOKENS_PER_IMAGE
    assert sample["pixel_values"].shape == (2, 3, 56, 56)
    blocks = [i for i in range(len(ids)) if ids[i] == image_id and (i == 0 or ids[i - 1] != image_id)]
    assert len(blocks) == 2  # two separate blocks of 16, text between them
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[blocks[1] - 1] == "second"
    # images in record order: the red one first
    red = processor.image_processor([Image.open(image_folder / "red.png")], return_tensors="pt")["pixel_values"]
    assert torch.equal(sample["pixel_values"][:1], red)
    # no placeholders: one "<image>\n" per image prepended to the first human turn
    bare = LlavaDataset([_record(["hello", "dog"], image=["red.png", "green_tall.png"])], image_folder, processor)[0]
    assert bare["input_ids"].tolist().count(image_id) == 2 * TOKENS_PER_IMAGE
    # a placeholder count that does not match the images is a bad record
    mismatched = [_record(["<image> hello", "dog"], image=["red.png", "green_tall.png"])]
    dataset = LlavaDataset(mismatched, image_folder, processor)
    assert dataset[0] is None and dataset.skipped == {"bad_record": 1}
    with pytest.raises(ValueError, match="s0"):
        LlavaDataset(mismatched, image_folder, processor, on_bad_image="error")[0]


def test_truncation(processor, image_folder, caplog):
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    record = _record(["<image>\nhello", "a red cat", "and then ?", "the dog sat on the mat"], image="red.png")
    full = LlavaDataset([record], image_folder, processor)[0]
    length = full["input_ids"].numel()
    last_image = max(i for i, token in enumerate(full["input_ids"].tolist()) if token == image_id)
    # cut inside the second answer: the end goes, the start is kept unchanged
    cut = length - 3
    short = LlavaDataset([record], image_folder, processor, max_length=cut)[0]
    assert torch.equal(short["input_ids"], full["input_ids"][:cut])
    assert torch.equal(short["labels"], full["labels"][:cut])
    assert _supervised_text(processor, short) == ["a red cat </s>", "the dog sat on"]
    # a cut through the image block: skipped as too long, never a partial block
    records = [record, dict(record, id="s1")]
    dataset = LlavaDataset(records, image_folder, processor, max_length=last_image)
    with caplog.at_level(logging.WARNING, logger="epic_ext.data.llava"):
        assert dataset[0] is None and dataset[1] is None and dataset[0] is None
    assert dataset.skipped == {"too_long": 2}  # counted once per sample
    assert dataset.skipped_ids == {"too_long": ["s0", "s1"]}
    assert "too_long" in caplog.text
    # just after the image block, before the first answer: no supervised token left
    dataset = LlavaDataset([record], image_folder, processor, max_length=last_image + 3)
    assert dataset[0] is None and dataset.skipped == {"no_labels": 1}
    # a max_length equal to the length keeps the sample whole
    assert torch.equal(LlavaDataset([record], image_folder, processor, max_length=length)[0]["input_ids"],
                       full["input_ids"])


@pytest.mark.parametrize("name, reason", [("corrupt.png", "corrupt_image"), ("absent.png", "missing_image")])
def test_bad_images(processor, image_folder, name, reason, caplog):
    records = [_record(["hello", "cat"], image="red.png", record_id="good"),
               _record(["hello", "cat"], image=name, record_id="bad")]
    dataset = LlavaDataset(records, image_folder, processor, on_bad_image="skip")
    assert dataset[0] is not None
    with caplog.at_level(logging.WARNING, logger="epic_ext.data.llava"):
        assert dataset[1] is None
    assert dataset.skipped == {reason: 1} and dataset.skipped_ids == {reason: ["bad"]}
    assert name in caplog.text
    strict = LlavaDataset(records, image_folder, processor, on_bad_image="error")
    with pytest.raises(ImageLoadError, match=name) as error:
        strict[1]
    assert "'bad'" in str(error.value)


def test_load_records_json_and_jsonl(tmp_path):
    records = [_record(["<image>\nhello", "cat"], image="a.png", record_id=1), _record(["hello", "dog"], record_id=2),
               _record(["first", "dog"], image=["a.png", "b.png"], record_id=3)]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "data.jsonl").write_text("\n" + "\n\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_records(tmp_path / "data.json") == records
    assert load_records(tmp_path / "data.jsonl") == records


def test_load_records_errors(tmp_path):
    lines = [json.dumps(_record(["hello", "cat"])), "", '{"id": 7, "conversations": [', json.dumps(_record(["a", "b"]))]
    (tmp_path / "broken.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3"):
        load_records(tmp_path / "broken.jsonl")
    (tmp_path / "missing.jsonl").write_text(json.dumps(_record(["a", "b"])) + "\n" + json.dumps({"id": "x9"}))
    with pytest.raises(ValueError, match="x9.*conversations"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "no_id.json").write_text(json.dumps([_record(["a", "b"]), {"conversations": [{"from": "bot"}]}]))
    with pytest.raises(ValueError, match="record 1"):
        load_records(tmp_path / "no_id.json")
    (tmp_path / "bad_image.json").write_text(json.dumps([_record(["a", "b"], image=3)]))
    with pytest.raises(ValueError, match="image"):
        load_records(tmp_path / "bad_image.json")


def test_pad_to_square(processor, image_folder):
    record = [_record(["hello", "cat"], image="red_wide.png")]
    stretched = LlavaDataset(record, image_folder, processor)[0]["pixel_values"][0]
    padded = LlavaDataset(record, image_folder, processor, pad_to_square=True)[0]["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1)
    red = (torch.tensor([220, 40, 40]).view(3, 1) / 255 - mean) / std
    background = (torch.tensor(LLAVA_BACKGROUND).view(3, 1) / 255 - mean) / std
    # 56x28 -> 56x56 with 14 background rows above and below; stretched fills everything with red
    torch.testing.assert_close(stretched.reshape(3, -1), red.expand(3, 56 * 56), atol=2e-2, rtol=0)
    torch.testing.assert_close(padded[:, :12].reshape(3, -1), background.expand(3, 12 * 56), atol=2e-2, rtol=0)
    torch.testing.assert_close(padded[:, -12:].reshape(3, -1), background.expand(3, 12 * 56), atol=2e-2, rtol=0)
    torch.testing.assert_close(padded[:, 16:40].reshape(3, -1), red.expand(3, 24 * 56), atol=2e-2, rtol=0)
    wide = Image.open(image_folder / "red_wide.png").convert("RGB")
    assert expand_to_square(wide).size == (56, 56)
    assert expand_to_square(wide).getpixel((0, 0)) == LLAVA_BACKGROUND


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate(processor, image_folder, padding_side):
    records = [_record(["hello", "cat"], image="red.png", record_id="a"),
               _record(["hello", "a red cat and a dog"], record_id="b"),
               _record(["hello", "cat"], image="absent.png", record_id="c"),
               _record(["first <image> second <image>", "dog"], image=["green_tall.png", "red.png"], record_id="d")]
    dataset = LlavaDataset(records, image_folder, processor)
    samples = [dataset[i] for i in range(len(dataset))]
    assert samples[2] is None
    pad = processor.tokenizer.pad_token_id
    batch = collate(samples, pad, padding_side=padding_side)
    assert batch["ids"] == ["a", "b", "d"]
    kept = [samples[0], samples[1], samples[3]]
    length = max(s["input_ids"].numel() for s in kept)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, length)
    for row, sample in enumerate(kept):
        n = sample["input_ids"].numel()
        real = slice(0, n) if padding_side == "right" else slice(length - n, length)
        pads = slice(n, length) if padding_side == "right" else slice(0, length - n)
        assert torch.equal(batch["input_ids"][row, real], sample["input_ids"])
        assert torch.equal(batch["labels"][row, real], sample["labels"])
        assert (batch["attention_mask"][row, real] == 1).all() and (batch["attention_mask"][row, pads] == 0).all()
        assert (batch["input_ids"][row, pads] == pad).all() and (batch["labels"][row, pads] == IGNORE_INDEX).all()
    expected_pixels = torch.cat([samples[0]["pixel_values"], samples[3]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected_pixels)
    assert collate([None, None], pad) is None
    text_only = LlavaCollator(pad, padding_side)([samples[1]])
    assert text_only["pixel_values"] is None and text_only["ids"] == ["b"]


def test_shapes_task_is_deterministic(tmp_path, processor):
    first = make_shapes_task(tmp_path / "a", 24, 8, 8, seed=3)
    second = make_shapes_task(tmp_path / "b", 24, 8, 8, seed=3)
    other = make_shapes_task(tmp_path / "c", 24, 8, 8, seed=4)
    for split in ("train", "val", "test"):
        assert filecmp.cmp(first[split], second[split], shallow=False)
        assert not filecmp.cmp(first[split], other[split], shallow=False)
    images = sorted(os.listdir(tmp_path / "a" / "images"))
    assert len(images) == 40
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "images", tmp_path / "b" / "images", images, shallow=False)
    assert not mismatch and not errors
    splits = {split: load_records(path) for split, path in first.items()}
    questions = {split: [r["conversations"][0]["value"] for r in records] for split, records in splits.items()}
    assert questions["val"] != questions["test"] and questions["val"] != questions["train"][:8]
    vocabulary = set(demo_vocabulary())
    unk = processor.tokenizer.unk_token_id
    families = set()
    for records in splits.values():
        for record in records:
            families.add(record["family"])
            answer = record["conversations"][1]["value"]
            assert answer == record["answer"] and " " not in answer and answer in vocabulary
            assert record["conversations"][0]["value"].startswith("<image>\n")
            assert unk not in processor.tokenizer(record["conversations"][0]["value"])["input_ids"]
            with Image.open(tmp_path / "a" / record["image"]) as image:
                assert image.size == (56, 56)
    assert families == {"color", "shape", "count", "exist"}


def test_tiny_processor_round_trip_and_forward(tmp_path, image_folder):
    from transformers import LlavaProcessor  # noqa: PLC0415

    from epic_ext.models import _hf  # noqa: PLC0415
    from epic_ext.models.tiny import build_tiny_llava  # noqa: PLC0415

    built = build_tiny_processor(demo_vocabulary(), save_dir=tmp_path / "processor")
    # the PIL image backend it was built with, also where torchvision is importable (its backend differs slightly)
    loaded = (LlavaProcessor.from_pretrained(tmp_path / "processor", backend="pil") if _hf.torchvision_available()
              else LlavaProcessor.from_pretrained(tmp_path / "processor"))
    assert len(loaded.tokenizer) == len(built.tokenizer)
    assert loaded.image_token_id == built.image_token_id == len(built.tokenizer) - 1
    prompt = ["USER: <image>\nwhat color is the shape in row one , column two ? ASSISTANT: red</s>"]
    image = [Image.open(image_folder / "green_tall.png")]
    expected, got = built(text=prompt, images=image, return_tensors="pt"), loaded(text=prompt, images=image,
                                                                                 return_tensors="pt")
    assert torch.equal(expected["input_ids"], got["input_ids"])
    assert torch.equal(expected["pixel_values"], got["pixel_values"])
    assert (got["input_ids"] == loaded.image_token_id).sum() == TOKENS_PER_IMAGE

    model = build_tiny_llava(vocab_size=len(loaded.tokenizer), text_layers=2)
    assert model.config.image_token_id == loaded.image_token_id
    records = [_record(["<image>\nhello", "red"], image="red.png", record_id="a"), _record(["hello", "dog cat"])]
    dataset = LlavaDataset(records, image_folder, loaded)
    batch = collate([dataset[0], dataset[1]], loaded.tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(loaded.tokenizer))
    assert torch.isfinite(out.loss)
