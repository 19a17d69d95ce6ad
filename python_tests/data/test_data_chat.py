"""Chat-template samples (epic_ext.data.chat) on a tiny offline Qwen tokenizer + image processor: the prompt is
the template's rendering with each image placeholder expanded to the image's token count, and exactly the answers
and their end-of-turn token are supervised."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from helpers.chat_assets import (IMAGE_SIZE, QWEN_CHAT_TEMPLATE, build_tiny_qwen_image_processor,  # noqa: E402
                                 build_tiny_qwen_tokenizer)

from epic_ext.data.video import VIDEO_DEFAULTS  # noqa: E402

from epic_ext.data.chat import ChatDataset, ChatProcessor, conversation_messages  # noqa: E402
from epic_ext.models.families import QWEN2_5_VL  # noqa: E402
from epic_ext.data.llava import collate  # noqa: E402

WORDS = ("what", "color", "is", "it", "and", "this", "one", "?", "red", "blue", "green", "yes", "no", "left", "right")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tokenizer = build_tiny_qwen_tokenizer(WORDS)
    # the fallback's video settings: the tiny image processor's pixel limits, so a frame is laid out as that image
    video_config = {**VIDEO_DEFAULTS["Qwen2VLVideoProcessor"], "size": {"shortest_edge": 56 * 56,
                                                                       "longest_edge": IMAGE_SIZE * IMAGE_SIZE}}
    return ChatProcessor(tokenizer=tokenizer, image_processor=build_tiny_qwen_image_processor(),
                         chat_template=QWEN_CHAT_TEMPLATE, source=str(tmp_path_factory.mktemp("unused")),
                         video_config=video_config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    sizes = {"square.png": (84, 84), "wide.png": (84, 56), "small.png": (56, 56)}
    for index, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * index, 100, 200)).save(folder / name)
    return folder


MULTI_TURN = {"id": "mt", "image": ["square.png", "wide.png"], "conversations": [
    {"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "and this one <image> ?"}, {"from": "gpt", "value": "blue and green"},
    {"from": "human", "value": "left or right ?"}, {"from": "gpt", "value": "left"}]}


def supervised_runs(sample):
    """The supervised tokens, as runs of consecutive positions."""
    runs, current, last = [], [], None
    for position, (token, label) in enumerate(zip(sample["input_ids"].tolist(), sample["labels"].tolist())):
        if label == -100:
            continue
        assert label == token
        if last is not None and position != last + 1:
            runs.append(current)
            current = []
        current.append(token)
        last = position
    return runs + ([current] if current else [])


def test_supervised_tokens_are_the_answers_and_their_end_of_turn(processor, images):
    dataset = ChatDataset([MULTI_TURN], images, processor, max_length=512)
    sample = dataset[0]
    tokenizer = processor.tokenizer
    answers = [turn["value"] for turn in MULTI_TURN["conversations"] if turn["from"] == "gpt"]
    runs = supervised_runs(sample)
    assert [tokenizer.decode(run) for run in runs] == [f"{answer} <|im_end|>" for answer in answers]
    for run, answer in zip(runs, answers):
        assert run == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # the token after each run is the newline-free start of the next turn (or the end): nothing else is supervised
    assert sum(len(run) for run in runs) == int((sample["labels"] != -100).sum())


def test_prompt_is_the_template_with_expanded_image_tokens(processor, images):
    """input_ids against an independent rendering: the template's text (one placeholder per image) tokenized, then
    each placeholder repeated grid_t * grid_h * grid_w / 4 times (84x84 -> 6x6 patches -> 9 tokens, 84x56 -> 6)."""
    dataset = ChatDataset([MULTI_TURN], images, processor, max_length=512)
    sample = dataset[0]
    tokenizer = processor.tokenizer
    messages = conversation_messages(MULTI_TURN["conversations"], 2)
    assert [c["type"] for c in messages[0]["content"]] == ["image", "text"]
    assert messages[0]["content"][1]["text"] == "what color is it ?"  # LLaVA's "\n" after <image> is dropped
    assert [c["type"] for c in messages[2]["content"]] == ["text", "image", "text"]
    text = tokenizer.apply_chat_template(messages, chat_template=QWEN_CHAT_TEMPLATE, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected, counts = [], iter([9, 6])
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        expected += [token] * (next(counts) if token == image_id else 1)
    assert sample["input_ids"].tolist() == expected
    assert sample["image_grid_thw"].tolist() == [[1, 6, 6], [1, 4, 6]]  # (t, h, w): 84 wide, 56 high
    assert sample["pixel_values"].shape == (36 + 24, 3 * 2 * 14 * 14)
    assert sample["mm_token_type_ids"].tolist() == [int(t == image_id) for t in expected]


def test_images_without_placeholders_go_first_and_batches_concatenate_grids(processor, images):
    records = [{"id": "a", "image": "small.png", "conversations": [{"from": "human", "value": "what color is it ?"},
                                                                   {"from": "gpt", "value": "green"}]},
               {"id": "b", "conversations": [{"from": "human", "value": "is it red ?"},
                                             {"from": "gpt", "value": "no"}]},
               MULTI_TURN]
    dataset = ChatDataset(records, images, processor, max_length=512)
    samples = [dataset[i] for i in range(3)]
    tokens = processor.tokenizer.convert_ids_to_tokens(samples[0]["input_ids"])
    user = tokens.index("user")
    assert tokens[user + 1: user + 7] == ["<|vision_start|>"] + ["<|image_pad|>"] * 4 + ["<|vision_end|>"]
    assert samples[1]["pixel_values"] is None and samples[1]["image_grid_thw"] is None
    batch = collate(samples, processor.tokenizer.pad_token_id, padding_side="left")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 6], [1, 4, 6]]
    assert batch["pixel_values"].shape[0] == 16 + 36 + 24
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert (batch["mm_token_type_ids"].bool() == (batch["input_ids"] == dataset.image_token_id)).all()
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding


def test_cut_inside_the_images_skips_and_cut_after_them_truncates(processor, images):
    dataset = ChatDataset([MULTI_TURN], images, processor, max_length=20)
    assert dataset[0] is None and dataset.skipped == {"too_long": 1}
    full = ChatDataset([MULTI_TURN], images, processor, max_length=512)[0]
    last_image = max(i for i, t in enumerate(full["input_ids"].tolist()) if t == full["input_ids"].max())
    cut = ChatDataset([MULTI_TURN], images, processor, max_length=last_image + 12)[0]
    assert cut["input_ids"].tolist() == full["input_ids"][: last_image + 12].tolist()
    assert cut["mm_token_type_ids"].numel() == last_image + 12


def test_template_without_end_of_turn_token_is_refused(processor, images):
    template = QWEN_CHAT_TEMPLATE.replace("{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>",
                                          "{{ content['text'] }}{% endif %}{% endfor %} .")
    broken = ChatProcessor(tokenizer=processor.tokenizer, image_processor=processor.image_processor,
                           chat_template=template, source=processor.source)
    with pytest.raises(ValueError, match="no end-of-turn token right after an answer"):
        ChatDataset([MULTI_TURN], images, broken, max_length=512)[0]


def test_save_pretrained_copies_the_processor_files(tmp_path):
    source = tmp_path / "ckpt"
    tokenizer = build_tiny_qwen_tokenizer(WORDS)
    tokenizer.save_pretrained(str(source))
    build_tiny_qwen_image_processor().save_pretrained(str(source))
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights")
    loaded = QWEN2_5_VL.load_processor(str(source))
    assert loaded.chat_template == QWEN_CHAT_TEMPLATE and loaded.image_processor.merge_size == 2
    loaded.save_pretrained(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" not in names and "model.safetensors" not in names
    assert QWEN2_5_VL.load_processor(str(tmp_path / "out")).tokenizer.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_distillation_rows_match_the_masked_reference(processor, images, family, padding):
    """EPIC's loss on a chat-template batch: the student's SFT sum equals the cross entropy of an independent
    reference (the unpatched eager model on the full sequence, dropped visual keys hidden from layer K on, see
    test_models_qwen_vl) at the supervised positions, so the kept rows map back to the right labels; the KL is
    taken against the teacher's rows of the same positions."""
    import torch
    from helpers.qwen_reference import kept_key_of, masked_reference

    from epic_ext.distill import DistillConfig, distillation_loss, shifted_targets
    from epic_ext.models import apply_compression
    from epic_ext.models.tiny import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl
    from epic_ext.schedules import CompressionStep

    builder = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl}[family]
    model = builder(seed=1, vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id)
    records = [MULTI_TURN, {"id": "one", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nis it red ?"}, {"from": "gpt", "value": "yes"}]}]
    if family == "qwen2_5_vl":  # a sample with a video and an image (Qwen3-VL video prompts are not built here)
        records.append({"id": "iv", "image": "small.png", "video": ["wide.png", "wide.png", "square.png"],
                        "conversations": [{"from": "human", "value": "<video> is it red ?"},
                                          {"from": "gpt", "value": "no"}]})
    dataset = ChatDataset(records, images, processor, max_length=512)
    batch = collate([dataset[i] for i in range(len(records))], processor.tokenizer.pad_token_id,
                    padding_side=padding)
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
    reference = masked_reference(model, inputs, 2, kept_key_of(model, batch["input_ids"], kept)).logits
    targets = shifted_targets(batch["labels"])
    rows = targets != -100
    expected = torch.nn.functional.cross_entropy(reference[rows], targets[rows], reduction="sum")
    # "red", "blue and green", "left", "yes" (, "no") and their end-of-turn tokens
    assert int(out["tokens"]) == int(rows.sum()) == 2 * 4 + 2 + 2 * (family == "qwen2_5_vl")
    torch.testing.assert_close(out["sft_sum"], expected, rtol=1e-5, atol=1e-5)
    assert float(out["kd_sum"]) > 0  # the teacher kept other tokens


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Three 84x56 frames of different colours (a 3-frame video pads to 4 by repeating the last)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("frames")
    for index in range(3):
        Image.new("RGB", (84, 56), (60 * index, 200 - 50 * index, 30)).save(folder / f"f{index}.png")
    return folder


def test_video_patches_hold_consecutive_frames(processor, frames):
    """Each video patch holds two consecutive frames: a video of one frame repeated equals that frame processed as an
    image (which fills both temporal slots with it), and in a 3-frame video the second group is frame 2 twice."""
    import torch
    from PIL import Image

    images = [Image.open(frames / f"f{i}.png").convert("RGB") for i in range(3)]
    as_image, counts = processor.visual_inputs([images[0]])
    video, tokens = processor.video_inputs([images[0], images[0]])
    assert video["video_grid_thw"].tolist() == [[1, 4, 6]] and tokens == counts[0] == 6
    torch.testing.assert_close(video["pixel_values_videos"], as_image["pixel_values"], rtol=0, atol=0)
    video, tokens = processor.video_inputs(images, fps=4.0)
    assert video["video_grid_thw"].tolist() == [[2, 4, 6]] and tokens == 12
    assert video["second_per_grid_ts"].tolist() == [0.5]
    last, _ = processor.visual_inputs([images[2]])
    torch.testing.assert_close(video["pixel_values_videos"][24:], last["pixel_values"], rtol=0, atol=0)
    first_two = video["pixel_values_videos"][:24].view(24, 3, 2, 14 * 14)
    for slot in (0, 1):
        alone, _ = processor.visual_inputs([images[slot]])
        torch.testing.assert_close(first_two[:, :, slot], alone["pixel_values"].view(24, 3, 2, -1)[:, :, 0])


def test_record_with_an_image_and_a_video(processor, images, frames):
    record = {"id": "iv", "image": "square.png", "video": [str(frames / f"f{i}.png") for i in range(3)],
              "conversations": [{"from": "human", "value": "<video>\nwhat color is it ? <image>"},
                                {"from": "gpt", "value": "green"}]}
    dataset = ChatDataset([record], images, processor, max_length=512)
    sample = dataset[0]
    tokens = processor.tokenizer.convert_ids_to_tokens(sample["input_ids"])
    user = tokens.index("user")
    assert tokens[user + 1: user + 15] == ["<|vision_start|>"] + ["<|video_pad|>"] * 12 + ["<|vision_end|>"]
    assert tokens.count("<|image_pad|>") == 9 and tokens.index("<|image_pad|>") > tokens.index("?")
    assert sample["mm_token_type_ids"].tolist() == [
        1 if t == "<|image_pad|>" else 2 if t == "<|video_pad|>" else 0 for t in tokens]
    assert [processor.tokenizer.decode(run) for run in supervised_runs(sample)] == ["green <|im_end|>"]
    assert sample["video_grid_thw"].tolist() == [[2, 4, 6]] and sample["pixel_values_videos"].shape[0] == 48
    # a video record for a family that takes images only is skipped as a bad record (or raises with "error")
    images_only = ChatProcessor(**{**processor.__dict__, "videos": False})
    assert ChatDataset([record], images, images_only, max_length=512)[0] is None
    with pytest.raises(ValueError, match="takes images only"):
        ChatDataset([record], images, images_only, max_length=512, on_bad_image="error")[0]


def test_save_pretrained_from_a_hub_id_saves_tokenizer_image_processor_and_template(processor, tmp_path):
    hub = ChatProcessor(**{**processor.__dict__, "source": "org/not-a-directory"})
    hub.save_pretrained(tmp_path / "out")
    loaded = QWEN2_5_VL.load_processor(str(tmp_path / "out"))
    assert loaded.chat_template == QWEN_CHAT_TEMPLATE
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()


def test_eval_skips_video_records(tmp_path):
    from epic_ext.eval import collect_items

    record = {"id": "v", "video": ["a.png"], "conversations": [{"from": "human", "value": "<video> what ?"},
                                                              {"from": "gpt", "value": "red"}]}
    items, skipped = collect_items([record], tmp_path)
    assert items == [] and skipped == {"bad_record": 1}
    with pytest.raises(ValueError, match="a video record: this model takes images only"):
        collect_items([record], tmp_path, on_bad_image="error")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_parameter_parts_split_qwen_models(family):
    """Vision tower / patch merger(s) = projector / language model + lm_head: every parameter exactly once."""
    from epic_ext.models.families import parameter_parts
    from epic_ext.models.tiny import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl

    model = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl}[family](seed=0)
    parts = parameter_parts(model)
    names = {id(p): n for n, p in model.named_parameters()}
    named = {part: sorted(names[id(p)] for p in params) for part, params in parts.items()}
    assert sorted(n for part in named.values() for n in part) == sorted(names.values())
    projector_prefixes = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    assert named["projector"] and all(n.startswith(projector_prefixes) for n in named["projector"])
    assert (family == "qwen3_vl") == any("deepstack_merger_list" in n for n in named["projector"])
    assert named["vision"] and all(n.startswith("model.visual.") and not n.startswith(projector_prefixes)
                                   for n in named["vision"])
    assert all(n.startswith(("model.language_model.", "lm_head.")) for n in named["llm"])
    assert "lm_head.weight" in named["llm"]
