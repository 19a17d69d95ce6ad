"""`python -m epic_ext.demo.model` (behind `make demo-model`): makes the demo's pretrained checkpoint.

The demo model is a tiny LLaVA (llava-hf format, with the offline word-level tokenizer and PIL processor of
epic_ext.demo.task) that knows the shapes task before any compression is applied. It is trained through the
product's own path (`python -m epic_ext.train`: the LLaVA-format JSON, DeepSpeed, the SFT loss) at full visual tokens
(`--schedule fixed --ratio 0 --lam 0`), in chunks of steps at a constant learning rate, each chunk resumed from
the last checkpoint and validated on the validation split; training stops when validation accuracy stops
improving (patience) or at the step cap, and the best chunk is kept. Then, on the validation split only, the
compression layer of the demo is chosen (the deepest layer whose zero-shot drop at 1/4 of the visual tokens is at
least DROP_TARGET points for the demo's method), and the model is measured once on the test split.

Everything goes into WORK_DIR (default build/demo_model; each stage is cached by epic_ext.demo.stages, complete or
absent, so an interrupted run resumes);
`--install` copies the model, its processor and its card (epic_demo.json: task, recipe, command, metrics, machine)
into epic_ext/assets/demo_model, where `make demo` reads it. The test-split numbers are reported, never used to
choose anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import shutil
import time

from .pipeline import ASSET_DIR, CARD_NAME, METHODS, majority_baseline
from .stages import Stages, chunked_sft, evaluate_dir, replace_dir, split_items, write_json

_logger = logging.getLogger(__name__)

# The task: 4 x 4 cells of 14 px on a 56 px canvas, so each cell is exactly one of the 16 visual tokens; every
# training image carries one question of each family and a caption (a 5-turn conversation: dense supervision, as
# LLaVA's caption pre-training), validation and test images one question.
TASK = dict(seed=0, image_size=56, grid=4, n_train=20000, n_val=300, n_test=1000, train_questions=1,
            train_caption=False)
MODEL = dict(hidden=64, text_layers=4, heads=4, kv_heads=2, vision_hidden=64, vision_layers=3, seed=0)
RECIPE = dict(lr=5e-4, batch=32, chunk_steps=2000, max_steps=16000, patience=4, min_improvement=0.5)
DEMO_METHOD = "random"
DROP_TARGET = 15.0  # points, at 1/4 of the visual tokens, on the validation split (10 + a margin for its noise)
ACCURACY_TARGET = 75.0  # test exact match at full tokens
FAMILY_MARGIN = 15.0  # points above the family's majority answer
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                "special_tokens_map.json")


def log(message: str) -> None:
    print(f"[demo-model {time.strftime('%H:%M:%S')}] {message}", flush=True)


N_VISUAL = (TASK["image_size"] // 14) ** 2


def stage_data(work: pathlib.Path) -> dict:
    """The task's splits and the untrained model (work/init_model)."""
    from ..models.tiny import build_tiny_llava  # noqa: PLC0415
    from .task import build_tiny_processor, demo_vocabulary, make_shapes_task  # noqa: PLC0415

    started = time.perf_counter()
    splits = make_shapes_task(work / "data", **{k: TASK[k] for k in ("n_train", "n_val", "n_test", "seed",
                                                                      "image_size", "grid", "train_questions",
                                                                      "train_caption")})
    processor = build_tiny_processor(demo_vocabulary(), image_size=TASK["image_size"], save_dir=work / "init_model")
    tok = processor.tokenizer
    model = build_tiny_llava(seed=MODEL["seed"], vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, hidden=MODEL["hidden"], text_layers=MODEL["text_layers"],
                             heads=MODEL["heads"], kv_heads=MODEL["kv_heads"], image_size=TASK["image_size"],
                             vision_hidden=MODEL["vision_hidden"], vision_layers=MODEL["vision_layers"])
    model.save_pretrained(str(work / "init_model"))
    log(f"data: {TASK['n_train']}/{TASK['n_val']}/{TASK['n_test']} images, model "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({time.perf_counter() - started:.0f} s)")
    return splits


def train_args(work: pathlib.Path, splits: dict, steps: int) -> list[str]:
    return ["--model", str(work / "init_model"), "--data", splits["train"], "--image-folder", str(work / "data"),
            "--output-dir", str(work / "train" / "run"), "--schedule", "fixed", "--ratio", "0.0", "--lam", "0",
            "--lr", str(RECIPE["lr"]), "--warmup-ratio", "0", "--min-lr-ratio", "1.0",
            "--micro-batch-size", str(RECIPE["batch"]), "--max-steps", str(steps),
            "--save-steps", str(RECIPE["chunk_steps"]), "--keep-checkpoints", "1", "--resume", "auto",
            "--no-freeze-vision", "--zero", "0", "--seed", str(MODEL["seed"]), "--max-length", "256",
            "--log-steps", "100"]


def stage_train(work: pathlib.Path, splits: dict) -> dict:
    """SFT at full tokens in chunks, validated after each; the best chunk's export is work/train/best."""
    return chunked_sft(work / "train", lambda steps: train_args(work, splits, steps),
                       split_items(splits, "val", work / "data"), N_VISUAL, chunk_steps=RECIPE["chunk_steps"],
                       max_steps=RECIPE["max_steps"], patience=RECIPE["patience"],
                       min_improvement=RECIPE["min_improvement"], log=log)


def stage_layer(work: pathlib.Path, splits: dict) -> dict:
    """The demo's layer, on the validation split: the deepest layer at which DEMO_METHOD at 1/4 of the visual
    tokens loses at least DROP_TARGET points (layer 0 when none does)."""
    val = split_items(splits, "val", work / "data")
    best = work / "train" / "best"
    keep = round(N_VISUAL / 4)
    full = evaluate_dir(best, val, [{"method": "random", "keep": N_VISUAL}])[0]["accuracy"]
    sweep = {}
    for layer in range(MODEL["text_layers"]):
        rows = evaluate_dir(best, val, [{"method": m, "keep": keep, "layer": layer} for m in METHODS])
        sweep[layer] = {row["method"]: full - row["accuracy"] for row in rows}
        log(f"validation drop at {keep}/{N_VISUAL} tokens, layer {layer}: "
            + ", ".join(f"{m} {d:.1f}" for m, d in sweep[layer].items()))
    deep = [layer for layer, drops in sweep.items() if drops[DEMO_METHOD] >= DROP_TARGET]
    return {"layer": max(deep) if deep else 0, "method": DEMO_METHOD, "keep": keep, "val_full": full,
            "val_drops": sweep, "rule": f"deepest layer whose validation drop for {DEMO_METHOD} at {keep}/{N_VISUAL} "
                                        f"tokens is >= {DROP_TARGET} points"}


def stage_test(work: pathlib.Path, splits: dict) -> dict:
    from ..data.records import load_records  # noqa: PLC0415

    test = split_items(splits, "test", work / "data")
    row = evaluate_dir(work / "train" / "best", test, [{"method": "random", "keep": N_VISUAL}])[0]
    majority = majority_baseline(load_records(splits["train"]), test)
    return {"n": len(test), "accuracy": row["accuracy"], "families": row["families"], "majority": majority}

def check_targets(test: dict) -> list[str]:
    """What the model misses of the demo's targets (empty: all met)."""
    problems = []
    if test["accuracy"] < ACCURACY_TARGET:
        problems.append(f"test accuracy {test['accuracy']:.1f}% < {ACCURACY_TARGET}%")
    for family, accuracy in test["families"].items():
        floor = test["majority"]["families"][family] + FAMILY_MARGIN
        if accuracy < floor:
            problems.append(f"{family} {accuracy:.1f}% < majority + {FAMILY_MARGIN:.0f} = {floor:.1f}%")
    return problems


def write_card(work: pathlib.Path, train: dict, layer: dict, test: dict, command: str) -> dict:
    import torch  # noqa: PLC0415

    best = work / "train" / "best"
    config = json.loads((best / "config.json").read_text())
    params = sum(t.numel() for t in _load_state(best).values())
    card = {
        "what": "tiny LLaVA pretrained on the shapes task at full visual tokens (epic_ext demo model)",
        "task": TASK, "model": dict(MODEL, parameters=params, visual_tokens=config["image_seq_length"]),
        "recipe": dict(RECIPE, schedule="fixed", ratio=0.0, lam=0.0, zero=0, freeze_vision=False),
        "command": command, "training": train,
        "demo": {"layer": layer["layer"], "method": layer["method"], "chosen_on": "validation split",
                 "rule": layer["rule"], "val_full": layer["val_full"], "val_drops": layer["val_drops"]},
        "test": test,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d")},
    }
    write_json(best / CARD_NAME, card)
    return card


def _load_state(model_dir: pathlib.Path) -> dict:
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(model_dir / "model.safetensors"))


def install(work: pathlib.Path, target: pathlib.Path = ASSET_DIR) -> None:
    """Copies the model files and the card into the package (nothing else of the export), atomically."""
    selection = work / "install"
    shutil.rmtree(selection, ignore_errors=True)
    selection.mkdir(parents=True)
    for name in (*_MODEL_FILES, CARD_NAME):
        if (work / "train" / "best" / name).is_file():
            shutil.copy2(work / "train" / "best" / name, selection / name)
    replace_dir(selection, target)
    log(f"installed into {target}: " + ", ".join(sorted(p.name for p in target.iterdir())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epic_ext.demo.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="build/demo_model", help="cache of every stage")
    parser.add_argument("--install", action="store_true", help="copy the result into epic_ext/assets/demo_model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = pathlib.Path(args.work_dir)
    stages = Stages(work, log)
    started = time.perf_counter()
    command = "make demo-model   # = python -m epic_ext.demo.model --install"
    splits = stages.run("data", lambda: stage_data(work))
    train = stages.run("train", lambda: stage_train(work, splits))
    log(f"training done: best validation accuracy {train['best_val_accuracy']:.1f}% at {train['best_steps']} steps")
    layer = stages.run("layer", lambda: stage_layer(work, splits))
    log(f"demo layer {layer['layer']} ({layer['rule']})")
    test = stages.run("test", lambda: stage_test(work, splits))
    log(f"test ({test['n']} questions): {test['accuracy']:.1f}% "
        + " ".join(f"{k} {v:.1f}" for k, v in test["families"].items())
        + f"; majority baseline {test['majority']['accuracy']:.1f}% "
        + " ".join(f"{k} {v:.1f}" for k, v in test["majority"]["families"].items()))
    write_card(work, train, layer, test, command)
    problems = check_targets(test)
    if args.install:
        install(work)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min (this run)")
    if problems:
        log("the model misses the demo's targets: " + "; ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
