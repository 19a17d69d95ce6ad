"""Offline lmms-eval tasks and runs for the plugin tests (python_tests/eval/test_lmms_eval_*.py): a task folder
(YAML + utils.py + JSONL of absolute image / video paths), generated videos, and `lmms-eval` run as a command with
the hub and datasets offline."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import subprocess
import sys

# The chat template published with the llava-hf LLaVA-1.5 checkpoints: "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
{generation}process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

# Scored as `python -m epic_ext.eval` scores (epic_ext.eval.normalize_answer).
TASK_UTILS = '''from PIL import Image

from epic_ext.eval import normalize_answer


def doc_to_visual(doc):
    if doc.get("video"):
        return [doc["video"]]
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
'''


def shapes_docs(records: list[dict], image_folder: str) -> list[dict]:
    """The task's docs from shapes-task records (epic_ext.demo.task): id, absolute image path, the question without
    its ``<image>`` placeholder, the answer."""
    docs = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        docs.append({"id": record["id"], "image": os.path.abspath(os.path.join(image_folder, record["image"])),
                     "question": question, "answer": record["conversations"][1]["value"]})
    return docs


def write_task(root: pathlib.Path, docs: list[dict], name: str = "epic_shapes", max_new_tokens: int = 8,
               generation: dict | None = None) -> str:
    """Writes root/<name>.yaml, root/utils.py and root/<name>.jsonl; returns the folder for --include_path.
    `generation`: more generation_kwargs."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    more = "".join(f"  {key}: {value}\n" for key, value in (generation or {}).items())
    (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, max_new_tokens=max_new_tokens,
                                                        generation=more))
    (root / "utils.py").write_text(TASK_UTILS)
    return str(root)


def write_video(path: pathlib.Path, frames: int = 6, size: int = 56, seed: int = 0) -> str:
    """An MPEG-4 video of `frames` frames: a square that moves across a coloured background (PyAV)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, size=3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for index in range(frames):
            image = np.tile(background, (size, size, 1)).astype(np.uint8)
            corner = index * (size // 2) // max(frames - 1, 1)
            image[corner:corner + size // 2, corner:corner + size // 2] = (255, 255, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def lmms_eval_env(root: pathlib.Path) -> dict:
    env = dict(os.environ, HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.pop("WORLD_SIZE", None)
    return env


def run_lmms_eval(root: pathlib.Path, model: str, model_args: str, include_path: str, task: str = "epic_shapes",
                  batch_size: int = 1, extra: list[str] | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                dict | None, list[dict]]:
    """Runs the `lmms-eval` command (the one installed beside this Python) on a local task; returns the process,
    the results JSON (None when none was written) and the logged samples in doc order."""
    out = root / "out"
    command = [os.path.join(os.path.dirname(sys.executable), "lmms-eval"), "--model", model, "--model_args",
               model_args, "--tasks", task, "--include_path", include_path, "--batch_size", str(batch_size),
               "--output_path", str(out), "--log_samples", "--verbosity", "INFO", *(extra or [])]
    process = subprocess.run(command, capture_output=True, text=True, env=lmms_eval_env(root), timeout=600)
    results_files = sorted(glob.glob(str(out / "**" / "*_results.json"), recursive=True))
    results = json.loads(pathlib.Path(results_files[-1]).read_text()) if results_files else None
    samples = []
    for sample_file in sorted(glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)):
        samples += [json.loads(line) for line in pathlib.Path(sample_file).read_text().splitlines() if line]
    samples.sort(key=lambda sample: sample["doc_id"])
    return process, results, samples


def answers_of(samples: list[dict]) -> list[str]:
    """The answer of each logged sample (its filtered response)."""
    answers = []
    for sample in samples:
        response = sample["filtered_resps"]
        answers.append(response if isinstance(response, str) else response[0])
    return answers
