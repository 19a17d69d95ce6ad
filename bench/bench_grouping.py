"""--group-by-length end to end: padding fraction and tokens/s of `python -m epic_ext.train` with and without it,
on a mixed-length data set (the demo shapes task's image records plus text-only records of 4..90 question words),
tiny llava model on CPU (DeepSpeed ZeRO-2, TCD, micro-batch 4, one process).

    .venv/bin/python bench/bench_grouping.py [--steps 30] [--text-records 160]

Prints a table and appends rows to bench/results/grouping.csv (device, commit). Numbers come from each run's
metrics.jsonl: padding_fraction (attention-mask zeros over all batch positions, the step's micro-batches summed)
and tokens/s (non-pad tokens over the steps' summed time, world size 1); the first 2 steps are warm-up and
left out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_tests"))
sys.path.insert(0, str(ROOT / "bench"))

WARMUP_STEPS = 2


def main(argv: list[str] | None = None) -> None:
    from common import device_name, git_commit
    from helpers.grouping_assets import add_text_only_records
    from helpers.train_assets import make_train_assets
    from helpers.train_runs import losses, run_train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--text-records", type=int, default=160)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        assets = make_train_assets(root / "assets")
        assets = dict(assets, data=add_text_only_records(assets["data"], root / "mixed.json", args.text_records))
        for label, flags in (("plain", ()), ("group-by-length", ("--group-by-length",))):
            out = root / label
            run_train(assets, out, "--zero", "2", "--max-steps", str(args.steps), "--schedule", "tcd", *flags)
            metrics = [row for step, row in sorted(losses(out).items()) if step > WARMUP_STEPS]
            rows.append({"run": label, "steps": len(metrics),
                         "padding_fraction": statistics.mean(r["padding_fraction"] for r in metrics),
                         # over the whole run (text-only and image steps differ in cost): tokens / seconds
                         "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in metrics)
                         / sum(r["step_time_s"] for r in metrics),
                         "step_time_s_mean": statistics.mean(r["step_time_s"] for r in metrics),
                         "final_loss": metrics[-1]["loss"]})
    print(f"{'run':<16} {'steps':>5} {'padding':>8} {'tokens/s':>9} {'step s':>7} {'loss':>7}")
    for r in rows:
        print(f"{r['run']:<16} {r['steps']:>5} {r['padding_fraction']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['step_time_s_mean']:>7.3f} {r['final_loss']:>7.3f}")
    results = ROOT / "bench" / "results" / "grouping.csv"
    new = not results.exists()
    with results.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["date", "device", "commit", "text_records", *rows[0]])
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({"date": datetime.date.today().isoformat(), "device": device_name("cpu"),
                             "commit": git_commit(), "text_records": args.text_records, **r})
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
