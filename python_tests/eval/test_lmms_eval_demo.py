"""`lmms-eval --model epic_ext` on the embedded demo model (LLaVA-1.5 format, 16 visual tokens), through the lmms-eval
command line on a local task (YAML + JSONL + generated images): its answers and score equal `python -m epic_ext.eval`'s
on the same records (all tokens and 4 of 16, batched against per-sample), equal lmms-eval's own LLaVA wrapper's at no
compression, and it fails loudly: a sample that cannot be generated ends the run naming it, a bad model argument is
one line before the model loads."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install '.[eval]'; `make test` installs it)")

from helpers.lmms_tasks import (LLAVA_CHAT_TEMPLATE, answers_of, run_lmms_eval, shapes_docs,  # noqa: E402
                                write_task, write_video)

from epic_ext.demo import DEMO_MODEL_DIR  # noqa: E402
from epic_ext.demo.task import make_shapes_task  # noqa: E402

pytestmark = pytest.mark.slow
LAYER, KEEP = 2, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo model copied with LLaVA-1.5's published chat template (lmms-eval's own wrapper renders prompts with
    it), 10 shapes records at the demo's image size and grid, the task folder, and `python -m epic_ext.eval`'s rows
    on the same records (per-sample: batch size 1)."""
    root = tmp_path_factory.mktemp("lmms_demo")
    model = root / "model"
    shutil.copytree(DEMO_MODEL_DIR, model)
    (model / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    splits = make_shapes_task(root / "data", n_train=0, n_val=0, n_test=10, seed=5, image_size=56, grid=4)
    records = json.loads(pathlib.Path(splits["test"]).read_text())
    task = write_task(root / "task", shapes_docs(records, str(root / "data")))
    rows_file = root / "rows.json"
    subprocess.run([sys.executable, "-m", "epic_ext.eval", "--model", str(model), "--data", splits["test"],
                    "--image-folder", str(root / "data"), "--keep", "16", str(KEEP), "--layer", str(LAYER),
                    "--batch-size", "1", "--max-new-tokens", "8", "--device", "cpu", "--output", str(rows_file)],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = {row["keep"]: row for row in json.loads(rows_file.read_text())}
    return {"root": root, "model": str(model), "task": task, "rows": rows, "records": records, "runs": {}}


def plugin_run(setup, name: str, model_args: str, batch_size: int = 4, model: str = "epic_ext", extra=()):
    """(results, answers) of an lmms-eval run on the task; each distinct run once per module."""
    key = (model, model_args, batch_size, tuple(extra))
    if key not in setup["runs"]:
        process, results, samples = run_lmms_eval(setup["root"] / name, model,
                                                  f"pretrained={setup['model']},{model_args}", setup["task"],
                                                  batch_size=batch_size, extra=list(extra))
        assert process.returncode == 0 and results is not None, process.stderr[-3000:]
        setup["runs"][key] = results, answers_of(samples)
    return setup["runs"][key]


@pytest.mark.parametrize("model_args, keep", [("device=cpu", 16), (f"method=fastv,layer={LAYER},keep={KEEP}", KEEP)],
                         ids=["all-16", "fastv-keep-4"])
def test_plugin_equals_epic_ext_eval(setup, model_args, keep):
    results, answers = plugin_run(setup, f"plugin-{keep}", model_args, batch_size=4)
    row = setup["rows"][keep]
    assert row["method"] == ("none" if keep == 16 else "fastv") and row["n"] == len(setup["records"])
    assert answers == row["predictions"]  # batched (4) here, per sample (1) there
    assert 100.0 * results["results"]["epic_shapes"]["exact_match,none"] == pytest.approx(row["accuracy"])
    # the setting and its measured cost are in the results
    assert f"keep={KEEP}" in results["config"]["model_args"] or keep == 16
    throughput = results["throughput"]
    assert throughput["avg_epic_visual_tokens"] == 16 and throughput["avg_epic_visual_tokens_kept"] == keep
    expected = _expected_cost(setup, keep)
    assert throughput["avg_epic_kv_mb"] == pytest.approx(expected["kv_mb"], rel=1e-9)
    assert throughput["avg_epic_prefill_tflops_exact"] == pytest.approx(expected["tflops"], rel=1e-9)


def _expected_cost(setup, keep: int) -> dict:
    """Per-sample means of epic_ext.cost's KV MB and exact prefill TFLOPs for each record's own prompt length."""
    from PIL import Image
    from transformers import AutoProcessor

    from epic_ext import cost

    processor = AutoProcessor.from_pretrained(setup["model"])
    shape = cost.model_shape(setup["model"])
    layer = 0 if keep == 16 else LAYER
    kv, flops = [], []
    for record in setup["records"]:
        image = Image.open(setup["root"] / "data" / record["image"]).convert("RGB")
        prompt = "USER: " + record["conversations"][0]["value"] + " ASSISTANT:"
        n = len(processor(text=prompt, images=[image])["input_ids"][0])
        kv.append(cost.kv_cache_bytes(shape, n, 16, layer, keep, 4) / 1e6)
        flops.append(cost.prefill_flops(shape, cost.tokens_per_layer(shape, n, 16, layer, keep), "exact", 1) / 1e12)
    return {"kv_mb": sum(kv) / len(kv), "tflops": sum(flops) / len(flops)}


def test_plugin_equals_lmms_eval_llava_wrapper_uncompressed(setup):
    """lmms-eval's own chat LLaVA wrapper (llava_hf, batch size 1) and the plugin with no compression arguments
    (batched) give the same answers and score on the same task."""
    _, ours = plugin_run(setup, "plugin-16", "device=cpu", batch_size=4)
    theirs_results, theirs = plugin_run(setup, "llava-hf", "device=cpu,device_map=cpu", batch_size=1,
                                        model="llava_hf")
    assert theirs_results["config"]["model_backend"].startswith("lmms_eval.models.chat.llava_hf")
    assert ours == theirs
    assert 100.0 * theirs_results["results"]["epic_shapes"]["exact_match,none"] == pytest.approx(
        setup["rows"][16]["accuracy"])


def test_simple_requests_equal_chat_requests(setup):
    """--force_simple: the plugin's simple class (context string + doc_to_visual) answers as its chat class does."""
    results, simple = plugin_run(setup, "plugin-simple", f"method=fastv,layer={LAYER},keep={KEEP}", batch_size=4,
                                 extra=["--force_simple"])
    _, chat = plugin_run(setup, f"plugin-{KEEP}", f"method=fastv,layer={LAYER},keep={KEEP}", batch_size=4)
    assert results["config"]["model_backend"] == "epic_ext.lmms_eval_plugin.EpicExtSimple (simple)"
    assert simple == chat


@pytest.mark.parametrize("plant", ["video-doc", "generate-raises"])
def test_a_sample_that_cannot_be_generated_fails_the_run(setup, tmp_path, plant):
    """A video doc for the images-only LLaVA-1.5 model (doc 3), or model.generate raising (num_beams 0: a
    ZeroDivisionError inside transformers, from doc 0): the run stops with status 1 and a line naming the doc; no
    results are written. lmms-eval's own LLaVA wrapper would score both as empty answers."""
    docs = shapes_docs(setup["records"][:3], str(setup["root"] / "data"))
    if plant == "video-doc":
        docs.append(dict(docs[0], id="video-doc", video=write_video(tmp_path / "clip.mp4")))
    task = write_task(tmp_path / "task", docs, generation={"num_beams": 0} if plant == "generate-raises" else None)
    process, results, _ = run_lmms_eval(tmp_path, "epic_ext", f"pretrained={setup['model']},device=cpu", task,
                                        batch_size=1)
    last = process.stderr.strip().splitlines()[-1]
    assert process.returncode == 1 and results is None, process.stderr[-2000:]
    expected = ("doc 3: ValueError: a video sample" if plant == "video-doc" else "doc 0: ZeroDivisionError")
    assert last.startswith(f"epic_ext: generation failed on epic_shapes/test {expected}"), last


@pytest.mark.parametrize("model_args, message", [
    ("method=fastx,keep=4", "epic_ext model_args: method must be one of"),
    ("method=fastv,layer=4,keep=4", "epic_ext model_args: layer must be in [0, 3] for method=fastv"),
    ("method=fastv,ratio=0.5,keep=4", "epic_ext model_args: give ratio or keep, not both"),
    ("keep=17", "epic_ext model_args: keep must be in [1, 16]"),
    ("method=fastv", "epic_ext model_args: method=fastv needs keep="),
    ("ratio=1.5", "epic_ext model_args: ratio must be a number in [0, 1)"),
    ("batch_size=0", "epic_ext model_args: batch_size must be an integer >= 1"),
    ("colour=red", "epic_ext model_args: unknown argument(s) colour"),
    ("dtype=int8", "epic_ext model_args: dtype must be one of"),
    ("max_pixels=200704", "epic_ext model_args: min_pixels / max_pixels are the Qwen2.5-VL / Qwen3-VL image"),
])
def test_bad_model_arguments_are_one_line_before_the_model_loads(setup, model_args, message):
    from epic_ext.lmms_eval_plugin import ModelArgumentError, parse_model_args
    from lmms_eval.utils import simple_parse_args_string

    with pytest.raises(ModelArgumentError) as raised:
        parse_model_args(**simple_parse_args_string(f"pretrained={setup['model']},{model_args}"))
    text = str(raised.value)
    assert text.startswith(message) and "\n" not in text, text


def test_bad_model_argument_on_the_command_line(setup, tmp_path):
    process, results, _ = run_lmms_eval(tmp_path, "epic_ext", f"pretrained={setup['model']},method=fastx,keep=4",
                                        setup["task"])
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 1 and results is None
    assert lines[-1].startswith("epic_ext model_args: method must be one of"), lines[-1]
    assert "Traceback" not in process.stderr and "Loading weights" not in process.stderr


def test_registered_through_the_entry_point_and_imported_only_by_lmms_eval():
    """The installed epic_ext declares the lmms_eval.models entry point; importing epic_ext (and its evaluation)
    never imports lmms_eval."""
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "epic_ext"]
    assert entry.value == "epic_ext.lmms_eval_plugin:MANIFEST"
    manifest = entry.load()
    assert manifest.chat_class_path.endswith(".EpicExt") and manifest.simple_class_path.endswith(".EpicExtSimple")
    code = "import sys, epic_ext, epic_ext.eval, epic_ext.models; assert 'lmms_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
