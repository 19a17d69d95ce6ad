"""`lmms-eval --model epic_ext` with no compression arguments answers as lmms-eval's own Qwen2.5-VL wrapper
(`--model qwen2_5_vl`, its chat class, the default) on the same local task: a tiny Qwen2.5-VL saved to a directory,
16 generated 84-px images and a 6-frame 56-px video, greedy, through the lmms-eval command line, at two pixel budgets.

What differs between the two, and how the runs line up (each checked here or stated in docs/evaluation.md):

- Pixel budget. The wrapper loads the checkpoint's processor with its own ``min_pixels=200704`` (256 * 28 * 28) and
  ``max_pixels=1605632`` unless told, so an 84-px image becomes 448 x 448 (256 visual tokens); the plugin uses the
  checkpoint's processor as saved (here 3136 / 7056: 9 tokens), and takes ``min_pixels`` / ``max_pixels`` to run at
  the wrapper's budget. Both budgets are compared, and they change the answers.
- dtype. The wrapper always loads bfloat16; the plugin loads the checkpoint's dtype (float32 for the tiny model,
  bfloat16 for the published Qwen2.5-VL checkpoints), so the plugin runs here with ``dtype=bf16``.
- System prompt. The wrapper's chat class sends no system message (its ``system_prompt`` argument is read by its
  simple class only); neither does the plugin, and the checkpoint's chat template writes its default
  "You are a helpful assistant." for both. The rendered prompts are compared as text (the tiny word-level tokenizer
  would not see a whitespace difference).
- Video frames. The wrapper takes min(max_num_frames, frames in the video), floored to an even count, read and
  resized to the budget by qwen-vl-utils; the plugin takes min(max_frames_num, frames in the video) with PyAV and
  resizes them in the image processor (before this test it repeated frames up to max_frames_num = 32, and the video's
  answer differed). Same frames for a short video of an even count (here: 6 of 6); for an odd count the wrapper drops
  a frame where the plugin repeats the last one (the video processor's own padding to the temporal patch), and for a
  video longer than the maximum qwen-vl-utils rounds the linspace indices where the plugin floors them (as lmms-eval's
  video loader and LLaVA wrapper do), so neighbouring frames can be picked. Upscaled frames differ by rounding.
- Batching. The wrapper runs at batch size 1 here (it probes the frame count of the first video of a batch only);
  the plugin answers the whole task in one left-padded batch, the video among the images.
- Stop strings. The wrapper's chat class ignores a task's ``until``; the plugin cuts answers at them (lmms-eval's
  simple wrappers do too). The tiny tokenizer never writes the default "\\n\\n", so this does not show here.
- ``--force_simple`` runs the wrapper's simple class, not compared: it re-encodes every image as JPEG (quality 85)
  before the processor, which the plugin does not do.

Besides the answers (the tiny random model's answers move with the prompt tokens and the visual tokens, e.g. with the
budget, but little with the image content at 9 tokens), test_model_inputs_equal compares what both feed the model for
an image doc and the video doc: prompt text, token ids, grids, video timing and pixels.

Needs torchvision (the wrapper's AutoProcessor builds Qwen2.5-VL's video processor), qwen-vl-utils and decord (the
wrapper's imports): skipped, saying which, where they are missing (the CPU torch 2.13 stack has no torchvision)."""

from __future__ import annotations

import json
import pathlib

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install '.[eval]'; `make test` installs it)")
pytest.importorskip("torchvision", reason="torchvision is not importable: lmms-eval's Qwen2.5-VL wrapper builds the "
                    "checkpoint's video processor, which needs it (the CPU torch 2.13 stack has none)")
pytest.importorskip("qwen_vl_utils", reason="qwen-vl-utils is not installed: lmms-eval's Qwen2.5-VL wrapper reads "
                    "visuals with it (pip install qwen-vl-utils)")
pytest.importorskip("decord", reason="decord is not installed: lmms-eval's Qwen2.5-VL wrapper imports it (pip install "
                    "decord==0.6.0)")
pytest.importorskip("av", reason="PyAV is not installed: the plugin decodes videos with it (the eval extra has it)")

from helpers.chat_assets import make_qwen_train_assets  # noqa: E402
from helpers.lmms_tasks import answers_of, run_lmms_eval, shapes_docs, write_task, write_video  # noqa: E402

pytestmark = pytest.mark.slow
VIDEO_FRAMES, VIDEO_SIZE = 6, 56
# (min_pixels, max_pixels): lmms-eval's Qwen2.5-VL wrapper's defaults, and the tiny checkpoint's image processor's
WRAPPER_BUDGET, CHECKPOINT_BUDGET = (256 * 28 * 28, 1605632), (56 * 56, 84 * 84)
# visual tokens per 84-px image / per two 56-px frames at each budget (448 px: 32 x 32 patches merged 2 x 2)
TOKENS = {WRAPPER_BUDGET: (256, 256), CHECKPOINT_BUDGET: (9, 4)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_qwen_builtin")
    assets = make_qwen_train_assets(root)
    records = json.loads(pathlib.Path(assets["test"]).read_text())
    docs = shapes_docs(records, assets["images"])
    docs.append({"id": "video", "video": write_video(root / "clip.mp4", frames=VIDEO_FRAMES, size=VIDEO_SIZE),
                 "image": None, "question": "what shape moves ?", "answer": "square"})
    return {"root": root, "model": assets["model"], "docs": docs, "task": write_task(root / "task", docs),
            "runs": {}}


def lmms_run(setup, model: str, model_args: str, batch_size: int):
    """(results, answers) of one lmms-eval run on the task, each distinct run once per module."""
    key = (model, model_args, batch_size)
    if key not in setup["runs"]:
        process, results, samples = run_lmms_eval(setup["root"] / f"run{len(setup['runs'])}", model,
                                                  f"pretrained={setup['model']},{model_args}", setup["task"],
                                                  batch_size=batch_size)
        assert process.returncode == 0 and results is not None, process.stderr[-3000:]
        setup["runs"][key] = results, answers_of(samples)
    return setup["runs"][key]


def wrapper_run(setup, budget):
    args = "device=cpu,device_map=cpu"
    if budget != WRAPPER_BUDGET:
        args += f",min_pixels={budget[0]},max_pixels={budget[1]}"
    return lmms_run(setup, "qwen2_5_vl", args, batch_size=1)


def plugin_run(setup, budget):
    args = "device=cpu,dtype=bf16"
    if budget != CHECKPOINT_BUDGET:
        args += f",min_pixels={budget[0]},max_pixels={budget[1]}"
    return lmms_run(setup, "epic_ext", args, batch_size=len(setup["docs"]))


@pytest.mark.parametrize("budget", [WRAPPER_BUDGET, CHECKPOINT_BUDGET], ids=["wrapper-budget", "checkpoint-budget"])
def test_plugin_uncompressed_equals_lmms_eval_qwen2_5_vl_wrapper(setup, budget):
    theirs_results, theirs = wrapper_run(setup, budget)
    ours_results, ours = plugin_run(setup, budget)
    assert theirs_results["config"]["model_backend"].startswith("lmms_eval.models.chat.qwen2_5_vl")
    assert ours == theirs
    score = "exact_match,none"
    assert ours_results["results"]["epic_shapes"][score] == theirs_results["results"]["epic_shapes"][score]
    # not trivially equal: an answer for every doc, several different ones (test_the_pixel_budget_changes_the_answers:
    # the visual inputs move them; test_model_inputs_equal: the inputs themselves)
    assert all(answer.strip() for answer in ours) and len(set(ours)) >= 3, ours
    # the plugin saw the visual tokens the budget gives (the wrapper reports none)
    image, two_frames = TOKENS[budget]
    images = len(setup["docs"]) - 1
    expected = (images * image + VIDEO_FRAMES // 2 * two_frames) / len(setup["docs"])
    assert ours_results["throughput"]["avg_epic_visual_tokens"] == pytest.approx(expected)


def test_the_pixel_budget_changes_the_answers(setup):
    """The two budgets give different answers (so each equality above says the budgets were matched)."""
    assert wrapper_run(setup, WRAPPER_BUDGET)[1] != wrapper_run(setup, CHECKPOINT_BUDGET)[1]


def wrapper_inputs(setup, messages, budget):
    """The model inputs lmms-eval's chat Qwen2.5-VL wrapper builds for one doc's messages at batch size 1
    (lmms_eval/models/chat/qwen2_5_vl.py, generate_until): to_hf_messages with its video kwargs, its AutoProcessor's
    chat template, qwen-vl-utils' process_vision_info, the processor."""
    import decord
    from lmms_eval.protocol import ChatMessages
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(setup["model"], min_pixels=budget[0], max_pixels=budget[1])
    chat = ChatMessages(messages=messages)
    _, videos, _ = chat.extract_media()
    video_kwargs = {"min_pixels": budget[0], "max_pixels": budget[1], "nframes": 32}
    if videos:
        video_kwargs["nframes"] = max(2, min(32, len(decord.VideoReader(videos[0]))) // 2 * 2)
    hf_messages = [chat.to_hf_messages(video_kwargs=video_kwargs)]
    text = processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    images, video_inputs, _ = process_vision_info(hf_messages, return_video_kwargs=True, return_video_metadata=True)
    metadata = None
    if video_inputs is not None:
        video_inputs, metadata = (list(part) for part in zip(*video_inputs))
    inputs = processor(text=text, images=images, videos=video_inputs, video_metadata=metadata, padding=True,
                       return_tensors="pt")
    return text[0], inputs


def plugin_inputs(setup, messages, budget):
    """The prompt text (before the visual tokens are expanded) and the model inputs the plugin builds for the same
    messages (its item, then epic_ext.eval.prompt_inputs)."""
    from epic_ext.data.chat import conversation_messages
    from epic_ext.eval import prompt_inputs
    from epic_ext.lmms_eval_plugin import DEFAULT_FRAMES, _item_from_messages, load_processor
    from epic_ext.models.families import QWEN2_5_VL

    processor = load_processor(QWEN2_5_VL, setup["model"], *budget)
    item = _item_from_messages(messages, DEFAULT_FRAMES)
    text = processor.render(conversation_messages([{"from": "human", "value": item["question"]}],
                                                  len(item["images"]), int("video" in item)),
                            add_generation_prompt=True)
    return text, prompt_inputs(processor, [item])


@pytest.mark.parametrize("budget", [WRAPPER_BUDGET, CHECKPOINT_BUDGET], ids=["wrapper-budget", "checkpoint-budget"])
@pytest.mark.parametrize("index", [0, -1], ids=["image", "video"])
def test_model_inputs_equal(setup, index, budget):
    """For one doc (lmms-eval's own messages for it): the same prompt text (compared as text: the tiny word-level
    tokenizer would not see a whitespace difference), token ids, grids, video timing, and pixels equal to float
    rounding (the video's frames decoded by decord there, PyAV here), except a video upscaled to the wrapper's budget
    (resized by qwen-vl-utils there)."""
    import torch
    from lmms_eval.api.task import ConfigurableMessagesTask
    from PIL import Image

    doc = setup["docs"][index]
    visuals = [doc["video"]] if doc.get("video") else [Image.open(doc["image"]).convert("RGB")]
    messages = ConfigurableMessagesTask._build_user_turn(visuals, doc["question"])
    their_text, theirs = wrapper_inputs(setup, messages, budget)
    our_text, ours = plugin_inputs(setup, messages, budget)
    assert our_text == their_text
    assert their_text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                 "<|vision_start|>")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    kind = "video" if doc.get("video") else "image"
    pixels, grid = ("pixel_values_videos", "video_grid_thw") if kind == "video" else ("pixel_values", "image_grid_thw")
    assert torch.equal(ours[grid], theirs[grid])
    tokens, two_frames = TOKENS[budget]
    assert int(ours[grid].prod()) // 4 == (tokens if kind == "image" else VIDEO_FRAMES // 2 * two_frames)
    if kind == "video":
        assert torch.allclose(ours["second_per_grid_ts"].float(), theirs["second_per_grid_ts"].float())
    difference = (ours[pixels].float() - theirs[pixels].float()).abs()
    if kind == "video" and budget == WRAPPER_BUDGET:
        # qwen-vl-utils resizes the 8-bit frames to the budget (56 -> 448 px) before the video processor; the plugin
        # resizes them in the image processor: measured max 0.085, mean 2.4e-4 (normalised), the answers equal
        assert difference.max().item() <= 0.1 and difference.mean().item() <= 1e-3, difference.max().item()
    else:
        assert difference.max().item() <= 1e-5, difference.max().item()


@pytest.mark.parametrize("model_args, message", [
    ("min_pixels=7056,max_pixels=3136", "epic_ext model_args: min_pixels (7056) must be <= max_pixels (3136)"),
    ("max_pixels=0", "epic_ext model_args: max_pixels must be an integer >= 1, got 0"),
])
def test_bad_pixel_budget_is_one_line(setup, model_args, message):
    from lmms_eval.utils import simple_parse_args_string

    from epic_ext.lmms_eval_plugin import ModelArgumentError, parse_model_args

    with pytest.raises(ModelArgumentError) as raised:
        parse_model_args(**simple_parse_args_string(f"pretrained={setup['model']},{model_args}"))
    assert str(raised.value) == message
