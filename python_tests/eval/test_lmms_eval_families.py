"""`lmms-eval --model epic_ext` on the other families, compressed (FastV, 4 visual tokens kept per sample, layer 1),
through the lmms-eval command line: tiny Qwen3-VL (images), LLaVA-OneVision (images and a video in one batch) and
LLaVA-NeXT (anyres images). The image answers equal epic_ext.eval's per-sample answers at the same setting."""

from __future__ import annotations

import json
import pathlib

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install '.[eval]'; `make test` installs it)")

from helpers.chat_assets import make_onevision_train_assets, make_qwen_train_assets  # noqa: E402
from helpers.next_assets import make_next_train_assets  # noqa: E402
from helpers.lmms_tasks import answers_of, run_lmms_eval, shapes_docs, write_task, write_video  # noqa: E402

pytestmark = pytest.mark.slow
N_IMAGES, KEEP, LAYER = 3, 4, 1


@pytest.mark.parametrize("family, video", [("qwen3_vl", False), ("llava_onevision", True), ("llava_next", False)])
def test_compressed_plugin_equals_epic_ext_eval(tmp_path, family, video):
    from epic_ext.eval import collect_items, evaluate
    from epic_ext.models.families import family_of_checkpoint

    assets = (make_onevision_train_assets(tmp_path) if family == "llava_onevision"
              else make_next_train_assets(tmp_path) if family == "llava_next"
              else make_qwen_train_assets(tmp_path, family))
    records = json.loads(pathlib.Path(assets["test"]).read_text())[:N_IMAGES]
    docs = shapes_docs(records, assets["images"])
    if video:
        docs.append({"id": "video", "video": write_video(tmp_path / "clip.mp4", frames=6, size=56), "image": None,
                     "question": "what shape moves ?", "answer": "square"})
    task = write_task(tmp_path / "task", docs)
    process, results, samples = run_lmms_eval(
        tmp_path, "epic_ext", f"pretrained={assets['model']},method=fastv,layer={LAYER},keep={KEEP},max_frames_num=4",
        task, batch_size=len(docs))
    assert process.returncode == 0 and results is not None, process.stderr[-3000:]
    answers = answers_of(samples)

    checkpoint_family = family_of_checkpoint(assets["model"])
    assert checkpoint_family.name == family
    model = checkpoint_family.load_model(assets["model"], "auto")
    processor = checkpoint_family.load_processor(assets["model"])
    items, _ = collect_items(records, assets["images"])
    (row,) = evaluate(model, processor, items, [{"method": "fastv", "keep": KEEP, "layer": LAYER}], batch_size=1)
    assert answers[:N_IMAGES] == row["predictions"]
    assert results["throughput"]["avg_epic_visual_tokens_kept"] == KEEP
    if video:
        assert answers[N_IMAGES].strip()
