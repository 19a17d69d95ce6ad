"""`lmms-eval --model epic_ext` on a chat-template family: a tiny Qwen2.5-VL saved to a directory, on a local task of
generated images and a generated video, through the lmms-eval command line. Its answers on the images equal
`python -m epic_ext.eval`'s (uncompressed and FastV 4 kept), batched answers equal per-sample answers with the video
in the batch, and the recorded visual tokens count the video's.

The comparison with lmms-eval's own Qwen2.5-VL wrapper (`--model qwen2_5_vl`) at no compression is
test_lmms_eval_qwen_builtin.py: the wrapper's AutoProcessor builds the family's video processor, which needs
torchvision, so it runs in the torch 2.14.1 + torchvision 0.29.1 stack and skips in the CPU torch 2.13 one (the
torchvision that pairs with it, 0.28.0, is built against the CUDA torch and does not import; the Makefile removes it).
The comparison for LLaVA-1.5 is in test_lmms_eval_demo.py."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install '.[eval]'; `make test` installs it)")

from helpers.chat_assets import make_qwen_train_assets  # noqa: E402
from helpers.lmms_tasks import answers_of, run_lmms_eval, shapes_docs, write_task, write_video  # noqa: E402

pytestmark = pytest.mark.slow
N_IMAGES, FRAMES, LAYER, KEEP = 4, 4, 1, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_qwen")
    assets = make_qwen_train_assets(root)
    records = json.loads(pathlib.Path(assets["test"]).read_text())[:N_IMAGES]
    data = root / "images.json"
    data.write_text(json.dumps(records))
    docs = shapes_docs(records, assets["images"])
    docs.append({"id": "video", "video": write_video(root / "clip.mp4", frames=6, size=56), "image": None,
                 "question": "what shape moves ?", "answer": "square"})
    rows_file = root / "rows.json"
    subprocess.run([sys.executable, "-m", "epic_ext.eval", "--model", assets["model"], "--data", str(data),
                    "--image-folder", assets["images"], "--keep", str(KEEP), "--layer", str(LAYER), "--batch-size",
                    "1", "--max-new-tokens", "8", "--device", "cpu", "--output", str(rows_file)],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = {row["method"]: row for row in json.loads(rows_file.read_text())}
    return {"root": root, "model": assets["model"], "task": write_task(root / "task", docs), "rows": rows,
            "runs": {}}


def plugin_run(setup, model_args: str, batch_size: int):
    key = (model_args, batch_size)
    if key not in setup["runs"]:
        name = f"run{len(setup['runs'])}"
        process, results, samples = run_lmms_eval(
            setup["root"] / name, "epic_ext", f"pretrained={setup['model']},max_frames_num={FRAMES},{model_args}",
            setup["task"], batch_size=batch_size)
        assert process.returncode == 0 and results is not None, process.stderr[-3000:]
        setup["runs"][key] = results, answers_of(samples)
    return setup["runs"][key]


def _visual_tokens(setup) -> float:
    """Mean visual tokens per doc: 84-px images are 6 x 6 patches merged 2 x 2 (9 tokens); the video's FRAMES
    56-px frames are 4 x 4 patches, 2 frames per temporal patch, merged 2 x 2 (FRAMES / 2 * 4 tokens)."""
    return (N_IMAGES * 9 + FRAMES // 2 * 4) / (N_IMAGES + 1)


@pytest.mark.parametrize("model_args, method", [("device=cpu", "none"),
                                                (f"method=fastv,layer={LAYER},keep={KEEP}", "fastv")])
def test_plugin_equals_epic_ext_eval_and_batched_equals_single(setup, model_args, method):
    batched_results, batched = plugin_run(setup, model_args, batch_size=N_IMAGES + 1)
    assert batched[:N_IMAGES] == setup["rows"][method]["predictions"]  # batched here, per sample there
    if method == "fastv":  # the video's answer too, with compression (one more run of lmms-eval: only here)
        _, single = plugin_run(setup, model_args, batch_size=1)
        assert batched == single  # the video shares the batch with the images
    assert batched[N_IMAGES].strip()  # the video got an answer
    throughput = batched_results["throughput"]
    assert throughput["avg_epic_visual_tokens"] == pytest.approx(_visual_tokens(setup))
    assert throughput["avg_epic_visual_tokens_kept"] == pytest.approx(_visual_tokens(setup) if method == "none"
                                                                      else KEEP)


def test_compression_changes_what_the_model_sees(setup):
    """The compressed run keeps 4 of 9 image tokens: FastV at layer 1 of a 2-layer model changes some answers
    (otherwise the equalities above could hold with compression silently off)."""
    _, full = plugin_run(setup, "device=cpu", batch_size=N_IMAGES + 1)
    _, compressed = plugin_run(setup, f"method=fastv,layer={LAYER},keep={KEEP}", batch_size=N_IMAGES + 1)
    assert full != compressed
