"""The embedded demo (`python -m epic_ext.demo`, behind `make demo`): EPIC on a model that knows its task.

It starts from the pretrained tiny LLaVA committed in the package (epic_ext/assets/demo_model, made by
`make demo-model` with `python -m epic_ext.demo.model`; its card epic_demo.json holds the task, the recipe, the
training metrics and the compression layer chosen on the validation split) and runs five stages:

1. data: the card's shapes task (same generator and seed, so the test split is the one the card was measured on),
   a slice of its training split for the EPIC run;
2. before: exact-match accuracy at full visual tokens and zero-shot under compression (each method at 1/2, 1/4 and
   1/8 of the visual tokens, at the card's layer), with the majority-answer baseline;
3. EPIC: a short TCD run from the checkpoint through the real training path (DeepSpeed, progress bar);
4. after: the same table for the EPIC model, and the share of each drop it recovered;
5. report: prefill FLOPs and KV cache of every setting, a plot (accuracy against visual tokens kept, before and
   after, one line per method) and OUTPUT_DIR/demo_summary.json with every number and each stage's wall time.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import shlex
import time

from ..cli import UsageError
from ..train.config import TrainConfig

_logger = logging.getLogger(__name__)

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "demo_model"
CARD_NAME = "epic_demo.json"
METHODS = ("fastv", "dart", "random")
FRACTIONS = (0.5, 0.25, 0.125)
# The EPIC run of the demo: TCD from the pretrained checkpoint (the card gives the method and the layer). Anything
# given on the command line wins over these.
DEMO_SETTINGS = dict(schedule="tcd", lr=5e-4, micro_batch_size=16, grad_accum=1, warmup_ratio=0.05,
                     freeze_vision=False, zero=2, save_steps=0, max_length=256, padding_side="right", log_steps=25)
DEMO_TRAIN_RECORDS = 4000  # the slice of the card's training split the EPIC run reads
DEMO_TEST_RECORDS = 400  # the first records of the card's test split


def load_card(model_dir: str | os.PathLike = ASSET_DIR) -> dict:
    """The demo model's card (task, recipe, metrics, demo layer and method).

    Raises:
        UsageError: the card is missing (the package was installed without its data files).
    """
    path = pathlib.Path(model_dir) / CARD_NAME
    if not path.is_file():
        raise UsageError(f"demo: the embedded demo model is missing ({path}); reinstall epic_ext, or rebuild it "
                         "with `make demo-model`")
    return json.loads(path.read_text())


def demo_config(options, card: dict, model_dir: str | os.PathLike = ASSET_DIR) -> TrainConfig:
    """The EPIC run of the demo: DEMO_SETTINGS, the card's method and layer, and the demo's command-line options
    (epic_ext.demo.__main__: output_dir, steps, and method, schedule, lr, seed where given)."""
    out = pathlib.Path(options.output_dir)
    data_dir = out / "demo_data"
    values = dict(DEMO_SETTINGS, method=card["demo"]["method"], layer=card["demo"]["layer"],
                  min_layer=card["demo"]["layer"])
    values.update({name: getattr(options, name) for name in ("method", "schedule", "lr", "seed")
                   if getattr(options, name, None) is not None})
    values.update(model=os.fspath(model_dir), data=os.fspath(data_dir / "train.json"), image_folder=os.fspath(data_dir),
                  output_dir=os.fspath(out / "epic"), max_steps=options.steps,
                  eval_data=os.fspath(data_dir / "test.json"))
    demo_cfg = TrainConfig(**values)
    demo_cfg.validate()
    return demo_cfg


def write_data(card: dict, data_dir: pathlib.Path) -> dict[str, str]:
    """The card's task: the first DEMO_TRAIN_RECORDS training and DEMO_TEST_RECORDS test records."""
    from .task import make_shapes_task  # noqa: PLC0415

    task = card["task"]
    return make_shapes_task(data_dir, n_train=min(DEMO_TRAIN_RECORDS, task["n_train"]), n_val=0,
                            n_test=min(DEMO_TEST_RECORDS, task["n_test"]), seed=task["seed"],
                            image_size=task["image_size"], grid=task["grid"],
                            train_questions=task.get("train_questions", 1),
                            train_caption=task.get("train_caption", False))


def majority_baseline(train_records: list[dict], test_items: list[dict]) -> dict:
    """Accuracy of answering each family's most common training answer (every turn of the training records)."""
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for record in train_records:
        families = record.get("families") or [record.get("family", "all")]
        replies = [turn["value"] for turn in record["conversations"] if turn.get("from") == "gpt"]
        for family, reply in zip(families, replies):
            answers[family][reply.strip().lower()] += 1
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for item in test_items:
        seen = answers.get(item["family"])
        guess = seen.most_common(1)[0][0] if seen else ""  # a family never seen in training: always wrong
        hits[item["family"]].append(guess == item["answer"].strip().lower())
    overall = [hit for values in hits.values() for hit in values]
    return {"accuracy": 100.0 * sum(overall) / max(len(overall), 1),
            "families": {f: 100.0 * sum(v) / len(v) for f, v in sorted(hits.items())},
            "answers": {f: c.most_common(1)[0][0] for f, c in sorted(answers.items())}}


def settings_for(n_visual: int, layer: int) -> list[dict]:
    """Full tokens, then every method at each fraction of the visual tokens."""
    settings = [{"method": "random", "keep": n_visual, "layer": layer}]
    for fraction in FRACTIONS:
        keep = max(1, round(n_visual * fraction))
        settings += [{"method": method, "keep": keep, "layer": layer} for method in METHODS]
    return settings


def _key(row: dict) -> tuple[str, int]:
    return row["method"], row["keep"]


def recovery_table(before: list[dict], after: list[dict]) -> list[dict]:
    """Per compressed setting: accuracy before/after, the drop from each model's own full-token accuracy and the
    share of the zero-shot drop (from the pretrained model's full-token accuracy) that EPIC recovered."""
    full_before = next(r["accuracy"] for r in before if r["method"] == "none")
    full_after = next(r["accuracy"] for r in after if r["method"] == "none")
    after_by_key = {_key(r): r for r in after}
    table = []
    for row in before:
        if row["method"] == "none":
            continue
        post = after_by_key[_key(row)]
        drop = full_before - row["accuracy"]
        recovered = (post["accuracy"] - row["accuracy"]) / drop if drop > 0 else None
        table.append({"method": row["method"], "keep": row["keep"], "before": row["accuracy"],
                      "after": post["accuracy"], "drop_before": drop, "drop_after": full_after - post["accuracy"],
                      "recovered": recovered, "prefill_gflops": 1000 * row["prefill_tflops_exact"],
                      "kv_mb": row["kv_mb"]})
    return table


def format_table(before: list[dict], after: list[dict], table: list[dict], n_visual: int, layer: int) -> str:
    full_b = next(r for r in before if r["method"] == "none")
    full_a = next(r for r in after if r["method"] == "none")
    head = (f"{'method':<7} {'kept':>9} {'before %':>9} {'after %':>8} {'drop':>6} {'recovered':>10} "
            f"{'GFLOPs':>8} {'KV MB':>7}")
    lines = [f"compression at layer {layer}; drop = full-token accuracy of the pretrained model minus before", head,
             "-" * len(head),
             f"{'none':<7} {str(n_visual) + '/' + str(n_visual):>9} {full_b['accuracy']:>9.1f} {full_a['accuracy']:>8.1f} "
             f"{'':>6} {'':>10} {1000 * full_b['prefill_tflops_exact']:>8.4f} {full_b['kv_mb']:>7.3f}"]
    for row in table:
        recovered = f"{100 * row['recovered']:.0f}%" if row["recovered"] is not None else "-"
        kept = f"{row['keep']}/{n_visual}"
        lines.append(f"{row['method']:<7} {kept:>9} {row['before']:>9.1f} {row['after']:>8.1f} "
                     f"{row['drop_before']:>6.1f} {recovered:>10} {row['prefill_gflops']:>8.4f} {row['kv_mb']:>7.3f}")
    return "\n".join(lines)


def plot(before: list[dict], after: list[dict], n_visual: int, layer: int, path: pathlib.Path) -> bool:
    """Accuracy against visual tokens kept, before (dashed) and after EPIC (solid), one colour per method."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        _logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green")))
    for rows, style, label in ((before, "--", "zero-shot"), (after, "-", "after EPIC")):
        full = next(r["accuracy"] for r in rows if r["method"] == "none")
        for method in METHODS:
            points = sorted((r["keep"], r["accuracy"]) for r in rows if r["method"] == method)
            points.append((n_visual, full))
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", color=colors[method],
                    label=f"{method}, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["keep"] for r in before}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(f"visual tokens kept of {n_visual} (compression at layer {layer})")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("EPIC demo: before (dashed) and after (solid) the TCD run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(options) -> int:
    """The whole demo (a world of one process) with the options of `python -m epic_ext.demo`. Returns the exit
    status."""
    from ..data.records import load_records  # noqa: PLC0415
    from ..eval import load_items  # noqa: PLC0415
    from ..train.loop import train  # noqa: PLC0415
    from ..train.preflight import preflight  # noqa: PLC0415
    from .stages import evaluate_dir  # noqa: PLC0415

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise UsageError("the demo runs in one process: start it with python -m epic_ext.demo, not a launcher")
    card = load_card()
    demo_config(options, card)  # the options against the card, before the data is written
    out = pathlib.Path(options.output_dir)
    times: dict[str, float] = {}
    started = time.perf_counter()
    write_data(card, out / "demo_data")
    demo_cfg = demo_config(options, card)
    run = preflight(demo_cfg)  # before anything heavy
    times["data_s"] = time.perf_counter() - started
    layer, n_visual = demo_cfg.layer, card["model"]["visual_tokens"]
    items = load_items(load_records(demo_cfg.eval_data), demo_cfg.image_folder)
    majority = majority_baseline(list(run.records), items)
    settings = settings_for(n_visual, layer)
    print(f"\nepic_ext demo: the pretrained tiny LLaVA of {ASSET_DIR} ({card['model']['parameters'] / 1e6:.2f}M "
          f"parameters, {n_visual} visual tokens), {len(items)} test questions, majority-answer baseline "
          f"{majority['accuracy']:.1f}%")
    print(f"[1/3] zero-shot: {len(settings)} settings ...", flush=True)
    mark = time.perf_counter()
    before = evaluate_dir(ASSET_DIR, items, settings, seed=demo_cfg.seed)
    times["eval_before_s"] = time.perf_counter() - mark
    print(f"      full tokens {before[0]['accuracy']:.1f}% ({times['eval_before_s']:.0f} s)")
    print(f"[2/3] EPIC: {demo_cfg.schedule.upper()} with {demo_cfg.method} at layer {layer}, {demo_cfg.max_steps} "
          f"steps from the checkpoint (DeepSpeed) ...", flush=True)
    mark = time.perf_counter()
    summary = train(run)
    times["epic_train_s"] = time.perf_counter() - mark
    print(f"[3/3] after EPIC: {len(settings)} settings ...", flush=True)
    mark = time.perf_counter()
    after = evaluate_dir(summary["export"], items, settings, seed=demo_cfg.seed)
    times["eval_after_s"] = time.perf_counter() - mark
    table = recovery_table(before, after)
    print("\n" + format_table(before, after, table, n_visual, layer))
    plotted = plot(before, after, n_visual, layer, out / "demo_accuracy.png")
    times["total_s"] = time.perf_counter() - started
    primary = next(r for r in table if r["method"] == demo_cfg.method and r["keep"] == round(n_visual / 4))
    result = {
        "model": os.fspath(ASSET_DIR), "card": {k: card[k] for k in ("task", "model", "test")},
        "n_test": len(items), "layer": layer, "method": demo_cfg.method, "visual_tokens": n_visual,
        "majority_baseline": majority, "full_before": before[0]["accuracy"], "full_after": after[0]["accuracy"],
        "before": before, "after": after, "recovery": table,
        "primary": {"method": demo_cfg.method, "keep": primary["keep"], "drop": primary["drop_before"],
                    "recovered": primary["recovered"]},
        "epic_run": {"output_dir": demo_cfg.output_dir, "export": summary["export"], "steps": summary["total_steps"],
                     "schedule": demo_cfg.schedule, "last": summary["last"]},
        "wall_times_s": times, "plot": os.fspath(out / "demo_accuracy.png") if plotted else None,
        "eval_command": eval_command(summary["export"], demo_cfg, n_visual),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1) + "\n")
    recovered = f"{100 * primary['recovered']:.0f}%" if primary["recovered"] is not None else "n/a (no drop)"
    print(f"\n{demo_cfg.method} at {primary['keep']}/{n_visual} tokens: drop {primary['drop_before']:.1f} points "
          f"zero-shot, {recovered} of it recovered by EPIC. Majority baseline {majority['accuracy']:.1f}%.")
    print(f"wall time: data {times['data_s']:.0f} s, zero-shot eval {times['eval_before_s']:.0f} s, EPIC "
          f"{times['epic_train_s']:.0f} s, eval after {times['eval_after_s']:.0f} s, total {times['total_s']:.0f} s")
    print(f"summary: {out / 'demo_summary.json'}" + (f"; plot: {out / 'demo_accuracy.png'}" if plotted else ""))
    print(f"reproduce the after-EPIC rows: {result['eval_command']}")
    return 0


def eval_command(model_dir: str, cfg: TrainConfig, n_visual: int) -> str:
    keeps = [n_visual] + [max(1, round(n_visual * f)) for f in FRACTIONS]
    args = ["python", "-m", "epic_ext.eval", "--model", model_dir, "--data", cfg.eval_data, "--image-folder",
            cfg.image_folder, "--method", *METHODS, "--keep", *map(str, keeps), "--layer", str(cfg.layer),
            "--batch-size", "50", "--max-new-tokens", "3", "--seed", str(cfg.seed)]
    return shlex.join(args)
