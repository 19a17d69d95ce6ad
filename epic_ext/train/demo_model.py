"""`python -m epic_ext.train.demo_model` (behind `make demo-model`): makes the demo's pretrained checkpoint.

The demo model is a tiny LLaVA (llava-hf format, with the offline word-level tokenizer and PIL processor of
epic_ext.train.demo_data) that knows the shapes task before any compression is applied. It is trained through the
product's own path (`python -m epic_ext.train`: the LLaVA-format JSON, DeepSpeed, the SFT loss) at full visual tokens
(`--schedule fixed --ratio 0 --lam 0`), in chunks of steps at a constant learning rate, each chunk resumed from
the last checkpoint and validated on the validation split; training stops when validation accuracy stops
improving (patience) or at the step cap, and the best chunk is kept. Then, on the validation split only, the
compression layer of the demo is chosen (the deepest layer whose zero-shot drop at 1/4 of the visual tokens is at
least DROP_TARGET points for the demo's method), and the model is measured once on the test split.

Everything goes into WORK_DIR (default build/demo_model; each stage is cached, so an interrupted run resumes);
`--install` copies the model, its processor and its card (epic_demo.json: task, recipe, command, metrics, machine)
into epic_ext/assets/demo_model, where `make demo` reads it. The test-split numbers are reported, never used to
choose anything.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

from .demo import ASSET_DIR, CARD_NAME, FRACTIONS, METHODS, majority_baseline

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


def stage_data(work: pathlib.Path) -> dict:
    from ..models.tiny import build_tiny_llava  # noqa: PLC0415
    from .demo_data import build_tiny_processor, demo_vocabulary, make_shapes_task  # noqa: PLC0415

    done = work / "data" / "splits.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    splits = make_shapes_task(work / "data", **{k: TASK[k] for k in ("n_train", "n_val", "n_test", "seed",
                                                                      "image_size", "grid", "train_questions",
                                                                      "train_caption")})
    processor = build_tiny_processor(demo_vocabulary(), image_size=TASK["image_size"], save_dir=work / "init_model")
    tok = processor.tokenizer
    model = build_tiny_llava(seed=MODEL["seed"], vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                             pad_token_id=tok.pad_token_id, hidden=MODEL["hidden"], text_layers=MODEL["text_layers"],
                             heads=MODEL["heads"], kv_heads=MODEL["kv_heads"], image_size=TASK["image_size"],
                             vision_hidden=MODEL["vision_hidden"], vision_layers=MODEL["vision_layers"])
    model.save_pretrained(str(work / "init_model"))
    done.write_text(json.dumps(splits))
    log(f"data: {TASK['n_train']}/{TASK['n_val']}/{TASK['n_test']} images, model "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({time.perf_counter() - started:.0f} s)")
    return splits


def train_args(work: pathlib.Path, splits: dict, steps: int) -> list[str]:
    return ["--model", str(work / "init_model"), "--data", splits["train"], "--image-folder", str(work / "data"),
            "--output-dir", str(work / "run"), "--schedule", "fixed", "--ratio", "0.0", "--lam", "0",
            "--lr", str(RECIPE["lr"]), "--warmup-ratio", "0", "--min-lr-ratio", "1.0",
            "--micro-batch-size", str(RECIPE["batch"]), "--max-steps", str(steps),
            "--save-steps", str(RECIPE["chunk_steps"]), "--keep-checkpoints", "1", "--resume", "auto",
            "--no-freeze-vision", "--zero", "0", "--seed", str(MODEL["seed"]), "--max-length", "256",
            "--log-steps", "100"]


def run_train(args: list[str], log_path: pathlib.Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    with log_path.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "epic_ext.train", *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}")


def evaluate_dir(model_dir: pathlib.Path, items: list[dict], settings: list[dict]) -> list[dict]:
    import torch  # noqa: PLC0415
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: PLC0415

    from ..eval import evaluate  # noqa: PLC0415

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    rows = evaluate(model, processor, items, settings, batch_size=50, max_new_tokens=3, device="cpu", seed=0)
    for row in rows:
        row.pop("predictions")
    return rows


def _items(splits: dict, split: str, work: pathlib.Path) -> list[dict]:
    from ..eval import load_items  # noqa: PLC0415
    from .data import load_records  # noqa: PLC0415

    return load_items(load_records(splits[split]), work / "data")


def stage_train(work: pathlib.Path, splits: dict) -> dict:
    """SFT at full tokens in chunks, validated after each; the best chunk's export is work/best."""
    out = work / "train"
    out.mkdir(parents=True, exist_ok=True)
    done = out / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    val = _items(splits, "val", work)
    n_visual = (TASK["image_size"] // 14) ** 2
    history_path = out / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    best, stale = -1.0, 0
    for entry in history:  # replay an interrupted run
        if entry["val_accuracy"] > best + RECIPE["min_improvement"]:
            best, stale = entry["val_accuracy"], 0
        else:
            stale += 1
    steps = history[-1]["steps"] if history else 0
    while steps < RECIPE["max_steps"] and stale < RECIPE["patience"]:
        steps += RECIPE["chunk_steps"]
        started = time.perf_counter()
        log(f"training steps {steps - RECIPE['chunk_steps']}..{steps} (log: {out / 'train.log'})")
        run_train(train_args(work, splits, steps), out / "train.log")
        row = evaluate_dir(work / "run" / "final", val, [{"method": "random", "keep": n_visual}])[0]
        entry = {"steps": steps, "val_accuracy": row["accuracy"], "families": row["families"],
                 "seconds": time.perf_counter() - started}
        history.append(entry)
        history_path.write_text(json.dumps(history, indent=1))
        log(f"{steps} steps: validation accuracy {row['accuracy']:.1f}% "
            + " ".join(f"{k} {v:.0f}" for k, v in row["families"].items()) + f" ({entry['seconds']:.0f} s)")
        if row["accuracy"] > best + RECIPE["min_improvement"]:
            best, stale = row["accuracy"], 0
            shutil.rmtree(work / "best", ignore_errors=True)
            shutil.copytree(work / "run" / "final", work / "best")
        else:
            stale += 1
    result = {"best_val_accuracy": best, "best_steps": max(history, key=lambda h: h["val_accuracy"])["steps"],
              "history": history, "wall_s": sum(h["seconds"] for h in history)}
    done.write_text(json.dumps(result, indent=1))
    return result


def stage_layer(work: pathlib.Path, splits: dict) -> dict:
    """The demo's layer, on the validation split: the deepest layer at which DEMO_METHOD at 1/4 of the visual
    tokens loses at least DROP_TARGET points (layer 0 when none does)."""
    path = work / "layer.json"
    if path.is_file():
        return json.loads(path.read_text())
    val = _items(splits, "val", work)
    n_visual = (TASK["image_size"] // 14) ** 2
    keep = round(n_visual / 4)
    full = evaluate_dir(work / "best", val, [{"method": "random", "keep": n_visual}])[0]["accuracy"]
    sweep = {}
    for layer in range(MODEL["text_layers"]):
        rows = evaluate_dir(work / "best", val, [{"method": m, "keep": keep, "layer": layer} for m in METHODS])
        sweep[layer] = {row["method"]: full - row["accuracy"] for row in rows}
        log(f"validation drop at {keep}/{n_visual} tokens, layer {layer}: "
            + ", ".join(f"{m} {d:.1f}" for m, d in sweep[layer].items()))
    deep = [layer for layer, drops in sweep.items() if drops[DEMO_METHOD] >= DROP_TARGET]
    result = {"layer": max(deep) if deep else 0, "method": DEMO_METHOD, "keep": keep, "val_full": full,
              "val_drops": sweep, "rule": f"deepest layer whose validation drop for {DEMO_METHOD} at {keep}/{n_visual} "
                                          f"tokens is >= {DROP_TARGET} points"}
    path.write_text(json.dumps(result, indent=1))
    return result


def stage_test(work: pathlib.Path, splits: dict, layer: dict) -> dict:
    from .data import load_records  # noqa: PLC0415

    path = work / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    test = _items(splits, "test", work)
    n_visual = (TASK["image_size"] // 14) ** 2
    row = evaluate_dir(work / "best", test, [{"method": "random", "keep": n_visual}])[0]
    majority = majority_baseline(load_records(splits["train"]), test)
    result = {"n": len(test), "accuracy": row["accuracy"], "families": row["families"], "majority": majority}
    path.write_text(json.dumps(result, indent=1))
    return result


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

    config = json.loads((work / "best" / "config.json").read_text())
    params = sum(t.numel() for t in _load_state(work / "best").values())
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
    (work / "best" / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n")
    return card


def _load_state(model_dir: pathlib.Path) -> dict:
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(model_dir / "model.safetensors"))


def install(work: pathlib.Path, target: pathlib.Path = ASSET_DIR) -> None:
    """Copies the model files and the card into the package (nothing else of the export)."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        old.unlink()
    for name in (*_MODEL_FILES, CARD_NAME):
        if (work / "best" / name).is_file():
            shutil.copy2(work / "best" / name, target / name)
    log(f"installed into {target}: " + ", ".join(sorted(p.name for p in target.iterdir())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epic_ext.train.demo_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="build/demo_model", help="cache of every stage")
    parser.add_argument("--install", action="store_true", help="copy the result into epic_ext/assets/demo_model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = "make demo-model   # = python -m epic_ext.train.demo_model --install"
    splits = stage_data(work)
    train = stage_train(work, splits)
    log(f"training done: best validation accuracy {train['best_val_accuracy']:.1f}% at {train['best_steps']} steps")
    layer = stage_layer(work, splits)
    log(f"demo layer {layer['layer']} ({layer['rule']})")
    test = stage_test(work, splits, layer)
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
