"""The staged, cached, resumable runner behind the demo model (`python -m epic_ext.demo.model`) and the ablation
(bench/ablation.py): training runs as `python -m epic_ext.train` subprocesses, evaluation of exported models, and
stage results cached in a work directory so that an interrupted pipeline resumes where it stopped.

A cache entry is complete or absent: JSON results are written to a temporary file and renamed into place, and a
directory (a chosen model) is copied to a temporary name and renamed, so a kill at any moment leaves either the old
entry or the new one, never half of one. A stage whose entry exists is not run again; one without it runs again
from its start (training chunks resume from their own checkpoints with `--resume auto`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- atomic files --
def write_json(path: pathlib.Path, value: Any, indent: int | None = 1) -> None:
    """Writes JSON to `path` atomically (a temporary file in the same directory, flushed, then renamed)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=indent)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_json(path: pathlib.Path) -> Any | None:
    """The JSON at `path`, or None when there is none."""
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def replace_dir(source: pathlib.Path, target: pathlib.Path) -> None:
    """Makes `target` a copy of `source` atomically: copied to a temporary sibling, then swapped in (the old target,
    if any, is renamed away first and removed after)."""
    source, target = pathlib.Path(source), pathlib.Path(target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.new")
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


class Stages:
    """Cached stages in a work directory: `run(name, compute)` returns the cached result of stage `name` or computes,
    caches (atomically) and returns it.

    Args:
        work: the work directory (created).
        log: a one-argument function for progress lines.
    """

    def __init__(self, work: pathlib.Path, log: Callable[[str], None] = print):
        self.work = pathlib.Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = log

    def path(self, name: str) -> pathlib.Path:
        return self.work / f"{name}.json"

    def run(self, name: str, compute: Callable[[], Any]) -> Any:
        cached = read_json(self.path(name))
        if cached is not None:
            return cached
        result = compute()
        write_json(self.path(name), result)
        return result


# -------------------------------------------------------------------------------------------- training and eval --
def run_train(args: Sequence[str], log_path: pathlib.Path, threads: int | None = None) -> None:
    """`python -m epic_ext.train ARGS` in a fresh single-process world (its own free MASTER_PORT), output appended
    to `log_path`.

    Raises:
        RuntimeError: the run failed (the exit status and the log named).
    """
    from ..train.loop import free_port  # noqa: PLC0415

    log_path = pathlib.Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    with log_path.open("a") as out:
        proc = subprocess.run([sys.executable, "-m", "epic_ext.train", *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}")


def evaluate_dir(model_dir: str | os.PathLike, items: list[dict], settings: list[dict], *, batch_size: int = 50,
                 seed: int = 0, max_new_tokens: int = 3, predictions: bool = False) -> list[dict]:
    """epic_ext.eval.evaluate of the checkpoint in `model_dir` (its family's class and processor, fp32, on the GPU
    when there is one). The rows keep their per-item predictions only when `predictions`."""
    import torch  # noqa: PLC0415

    from ..eval import evaluate  # noqa: PLC0415
    from ..models.families import family_of_checkpoint  # noqa: PLC0415

    family = family_of_checkpoint(os.fspath(model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = family.load_model(os.fspath(model_dir), torch.float32).to(device)
    processor = family.load_processor(os.fspath(model_dir))
    rows = evaluate(model, processor, items, settings, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    device=device, seed=seed)
    if not predictions:
        for row in rows:
            row.pop("predictions")
    return rows


def split_items(splits: dict, split: str, data_dir: pathlib.Path) -> list[dict]:
    """The evaluation items of one split of a generated task (epic_ext.eval.load_items)."""
    from ..data.records import load_records  # noqa: PLC0415
    from ..eval import load_items  # noqa: PLC0415

    return load_items(load_records(splits[split]), data_dir)


def chunked_sft(out: pathlib.Path, train_args: Callable[[int], list[str]], val_items: list[dict], n_visual: int, *,
                chunk_steps: int, max_steps: int, patience: int, min_improvement: float,
                threads: int | None = None, eval_batch_size: int = 50, eval_seed: int = 0,
                log: Callable[[str], None] = print) -> dict:
    """Trains in chunks of `chunk_steps` (one resumed `python -m epic_ext.train` per chunk), validates each chunk's
    export at full visual tokens, and keeps the best one in out/best, until `max_steps` or `patience` chunks without
    an improvement of more than `min_improvement` points. Resumable: the history (out/history.json) is replayed, and
    a chunk's run resumes from its own checkpoint.

    Args:
        out: the stage's directory (the run goes to out/run, its log to out/train.log).
        train_args: steps -> the training command line of a run that ends at `steps` and writes out/run.

    Returns:
        best_val_accuracy, best_steps, history (steps, val_accuracy, families, seconds per chunk), wall_s.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history_path = out / "history.json"
    history = read_json(history_path) or []
    best, stale = -1.0, 0
    for entry in history:  # replay an interrupted run
        if entry["val_accuracy"] > best + min_improvement:
            best, stale = entry["val_accuracy"], 0
        else:
            stale += 1
    steps = history[-1]["steps"] if history else 0
    while steps < max_steps and stale < patience:
        steps += chunk_steps
        started = time.perf_counter()
        log(f"training steps {steps - chunk_steps}..{steps} (log: {out / 'train.log'})")
        run_train(train_args(steps), out / "train.log", threads=threads)
        row = evaluate_dir(out / "run" / "final", val_items, [{"method": "random", "keep": n_visual}],
                           batch_size=eval_batch_size, seed=eval_seed)[0]
        entry = {"steps": steps, "val_accuracy": row["accuracy"], "families": row["families"],
                 "seconds": time.perf_counter() - started}
        log(f"{steps} steps: validation accuracy {row['accuracy']:.1f}% "
            + " ".join(f"{k} {v:.0f}" for k, v in row["families"].items()) + f" ({entry['seconds']:.0f} s)")
        if row["accuracy"] > best + min_improvement:
            best, stale = row["accuracy"], 0
            replace_dir(out / "run" / "final", out / "best")  # before the history claims it
        else:
            stale += 1
        history.append(entry)
        write_json(history_path, history)
    return {"best_val_accuracy": best, "best_steps": max(history, key=lambda h: h["val_accuracy"])["steps"],
            "history": history, "wall_s": sum(h["seconds"] for h in history)}
