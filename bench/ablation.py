"""A miniature reproduction of EPIC's ablations (paper Tables 3 and 4) on the generated shapes task.

    python bench/ablation.py --profile quick|full [--schedule-constants paper|release] [--work-dir DIR]

Every stage goes through the product's own code paths: the task generator and offline processor of the demo,
`python -m epic_ext.train` (DeepSpeed, schedules, distillation loss) as subprocesses, and epic_ext.eval with the
compressors. Stages are cached under the work directory (default build/ablation/<profile>): a finished model is
never trained again, so an interrupted run resumes where it stopped.

1. data: train / validation / test splits from fixed seeds.
2. stage 1: the model every variant starts from. With `"base": "demo_model"` (the quick profile) it is the
   pretrained demo checkpoint committed in the package (epic_ext/assets/demo_model, `make demo-model`), on its own
   task (the card's generator settings; the profile gives the split sizes) and, with `"layer": "demo"`, at the
   layer its card chose on the validation split. Otherwise a tiny LLaVA is trained here with all visual tokens,
   validated every chunk of steps, until the validation accuracy stops improving (patience) or the step cap; the
   best chunk's export is the stage-1 model.
3. stage 2: from the stage-1 model, every variant x seed with the same step budget, with the TCD constants of a
   preset (`--schedule-constants`, else the profile's `schedule_constants`; lambda is the preset's unless the
   profile sets `lam`). Stage 2 and the evaluations are cached per preset (stage2/<preset>, eval/<preset>); the
   data and stage 1 are shared.
4. eval: every model (and the zero-shot stage-1 model) on the test split at each fraction of visual tokens with
   every method; identical items and, for Random, identical drop patterns for every model (paired). The
   zero-shot gap of the primary method is measured first: under 10 points the setting is reported uninformative.
5. report: JSON, bench/results/ablation_<profile>-<preset>.md (mean and std over seeds, paired differences with
   bootstrap 95% intervals) and a PNG plot (accuracy vs kept visual tokens, one line per variant).

Hyperparameters live in bench/ablation_profiles/<profile>.json and are chosen on the validation split only; the
test split is read once per model, in stage 4.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import random
import time

from epic_ext.demo.stages import chunked_sft, evaluate_dir, read_json, run_train, split_items, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILES = ROOT / "bench" / "ablation_profiles"
RESULTS = ROOT / "bench" / "results"

# variant -> train arguments (schedule, lambda, extra schedule constants); the compression target and layer come
# from the profile (its `layer` plays the paper's layer 2). The paper's ablation rows: Table 3 "w/o progressive
# compression ratio" = tcd_no_progressive_ratio (the student ratio drawn from the final range from the first step,
# layer fixed), Table 4 "w/o progressive compression layer" = lcd_fixed_layer (LCD's target ratio and growing
# teacher gap at the fixed layer), Table 5 = icd.
VARIANTS = {
    "fixed_sft": dict(schedule="fixed", lam=0.0, label="fixed ratio, SFT only"),
    "fixed_kd": dict(schedule="fixed", lam=None, teacher_gap=True, label="fixed ratio + distillation"),
    "tcd_no_kd": dict(schedule="tcd", lam=0.0, label="progressive ratio, SFT only (TCD w/o KD)"),
    "tcd": dict(schedule="tcd", lam=None, label="TCD"),
    "lcd": dict(schedule="lcd", lam=None, label="LCD"),
    "lcd_no_kd": dict(schedule="lcd", lam=0.0, label="LCD w/o KD"),
    "lcd_fixed_layer": dict(schedule="fixed", lam=None, teacher_gap=True,
                            label="LCD w/o progressive compression layer (Table 4)", same_as="fixed_kd"),
    "tcd_no_progressive_ratio": dict(schedule="tcd", lam=None, constants={"progressive_ratio": False},
                                     label="TCD w/o progressive compression ratio (Table 3)"),
    "icd": dict(schedule="icd", lam=None, label="ICD (Table 5)"),
    "tcd_lcd": dict(schedule="tcd+lcd", lam=None, label="TCD+LCD (both at once, ours)"),
}
# key comparisons: (better?, baseline)
COMPARISONS = [("tcd", "fixed_sft"), ("tcd", "tcd_no_kd"), ("tcd", "fixed_kd"), ("tcd", "tcd_no_progressive_ratio"),
               ("lcd", "lcd_no_kd"), ("lcd", "lcd_fixed_layer"), ("lcd", "fixed_sft"), ("icd", "tcd"),
               ("icd", "lcd"), ("tcd_lcd", "tcd"), ("fixed_sft", "zero_shot")]
PRESETS = ("paper", "release")  # TCD constant presets of epic_ext.schedules


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_profile(name: str) -> dict:
    path = PROFILES / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--profile: no {path} (available: {sorted(p.stem for p in PROFILES.glob('*.json'))})")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------- stages --
def demo_card() -> dict:
    from epic_ext.demo.pipeline import load_card

    return load_card()


def resolve_base(profile: dict) -> None:
    """A profile on the committed demo model takes its task generator settings and (with "layer": "demo") its
    layer from the model's card; the split sizes stay the profile's."""
    if profile.get("base") == "demo_model":
        card = demo_card()
        sizes = {k: profile["task"][k] for k in ("n_train", "n_val", "n_test")}
        profile["task"] = dict(card["task"], **sizes)
        if profile["layer"] == "demo":
            profile["layer"] = card["demo"]["layer"]
    elif profile.get("base") is not None:
        raise SystemExit(f"profile {profile['name']}: base must be \"demo_model\" or absent, got {profile['base']!r}")
    if not isinstance(profile["layer"], int):
        raise SystemExit(f"profile {profile['name']}: layer must be an int (or \"demo\" with base demo_model)")


def stage_data(profile: dict, work: pathlib.Path) -> dict:
    done = work / "data" / "splits.json"  # written last: the stage is complete or runs again
    if done.is_file():
        return json.loads(done.read_text())
    from epic_ext.demo.task import build_tiny_processor, demo_vocabulary, make_shapes_task
    from epic_ext.models.tiny import build_tiny_llava

    task = profile["task"]
    if profile.get("base") == "demo_model":
        splits = make_shapes_task(work / "data", **{k: task[k] for k in (
            "n_train", "n_val", "n_test", "seed", "image_size", "grid", "train_questions", "train_caption")})
        write_json(done, splits)
        log(f"data: {task['n_train']}/{task['n_val']}/{task['n_test']} items of the demo model's task")
        return splits
    splits = make_shapes_task(work / "data", n_train=task["n_train"], n_val=task["n_val"], n_test=task["n_test"],
                              seed=task["seed"], image_size=task["image_size"], grid=task["grid"])
    model_dir = work / "init_model"
    processor = build_tiny_processor(demo_vocabulary(), image_size=task["image_size"], save_dir=model_dir)
    tok = processor.tokenizer
    m = profile["model"]
    model = build_tiny_llava(seed=m["seed"], vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                             pad_token_id=tok.pad_token_id, hidden=m["hidden"], text_layers=m["text_layers"],
                             heads=m["heads"], kv_heads=m["kv_heads"], image_size=task["image_size"],
                             vision_hidden=m.get("vision_hidden", 32), vision_layers=m.get("vision_layers", 2))
    model.save_pretrained(str(model_dir))
    write_json(done, splits)
    log(f"data: {task['n_train']}/{task['n_val']}/{task['n_test']} items, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return splits


def _evaluate(model_dir: pathlib.Path, items: list[dict], settings: list[dict], profile: dict) -> list[dict]:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return evaluate_dir(model_dir, items, settings, batch_size=profile["eval"]["batch_size"],
                        seed=profile["eval"]["seed"], predictions=True)


def stage1(profile: dict, work: pathlib.Path, splits: dict) -> pathlib.Path:
    """SFT with all visual tokens in chunks, validating after each; returns the best chunk's export (or the
    committed demo model for a profile based on it)."""
    if profile.get("base") == "demo_model":
        from epic_ext.demo import DEMO_MODEL_DIR as ASSET_DIR

        log(f"stage 1: the committed demo model ({ASSET_DIR}), layer {profile['layer']}")
        return ASSET_DIR
    out = work / "stage1"
    if read_json(out / "done.json") is not None:
        return out / "best"
    s1 = profile["stage1"]

    def train_args(steps: int) -> list[str]:
        return ["--model", str(work / "init_model"), "--data", splits["train"], "--image-folder", str(work / "data"),
                "--output-dir", str(out / "run"), "--schedule", "fixed", "--ratio", "0.0", "--lam", "0",
                "--layer", str(profile["layer"]), "--lr", str(s1["lr"]), "--warmup-ratio", "0",
                "--min-lr-ratio", "1.0", "--micro-batch-size", str(s1["batch"]), "--max-steps", str(steps),
                "--save-steps", str(s1["chunk_steps"]), "--keep-checkpoints", "1", "--resume", "auto",
                "--no-freeze-vision", "--zero", "0", "--seed", str(profile["model"]["seed"]), "--max-length", "256"]

    result = chunked_sft(out, train_args, split_items(splits, "val", work / "data"),
                         (profile["task"]["image_size"] // 14) ** 2, chunk_steps=s1["chunk_steps"],
                         max_steps=s1["max_steps"], patience=s1["patience"], min_improvement=s1["min_improvement"],
                         threads=os.cpu_count() or 2, eval_batch_size=profile["eval"]["batch_size"],
                         eval_seed=profile["eval"]["seed"], log=lambda message: log(f"stage 1: {message}"))
    write_json(out / "done.json", result)
    return out / "best"


def variant_constants(profile: dict, spec: dict) -> str:
    """--schedule-constants of one variant: the run's preset, the profile's overrides, the variant's own."""
    return json.dumps({"preset": profile["preset"], **profile.get("schedule_overrides", {}),
                       **spec.get("constants", {})}, sort_keys=True)


def stage2(profile: dict, work: pathlib.Path, splits: dict, base: pathlib.Path) -> dict:
    s2 = profile["stage2"]
    root = work / "stage2" / profile["preset"]
    jobs = []
    for variant in s2["variants"]:
        spec = VARIANTS[variant]
        if "same_as" in spec and spec["same_as"] in s2["variants"]:
            continue  # identical configuration: evaluated from the other variant's models
        for seed in s2["seeds"]:
            target = root / variant / f"seed{seed}"
            if (target / "final" / "config.json").is_file():
                continue
            lam = profile.get("lam") if spec["lam"] is None else spec["lam"]  # None: the preset's
            args = ["--model", str(base), "--data", splits["train"], "--image-folder", str(work / "data"),
                    "--output-dir", str(target), "--method", s2["train_method"], "--schedule", spec["schedule"],
                    "--ratio", str(profile["ratio"]), "--layer", str(profile["layer"]), "--min-layer",
                    str(profile["layer"]), "--tau", str(profile["tau"]), "--lr", str(s2["lr"]),
                    "--warmup-ratio", "0.05", "--micro-batch-size", str(s2["batch"]), "--max-steps",
                    str(s2["steps"]), "--no-freeze-vision", "--zero", "0", "--seed", str(seed), "--max-length", "256",
                    "--schedule-constants", variant_constants(profile, spec)]
            if lam is not None:
                args += ["--lam", str(lam)]
            if spec.get("teacher_gap"):
                args += ["--teacher-ratio", "gap"]
            jobs.append((variant, seed, target, args))
    log(f"stage 2: {len(jobs)} runs to train ({s2['parallel']} at a time)")

    def one(job):
        variant, seed, target, args = job
        target.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        run_train(args, target / "train.log", threads=max(1, (os.cpu_count() or 2) // s2["parallel"]))
        log(f"stage 2: {variant} seed {seed} trained in {time.perf_counter() - started:.0f} s")

    with concurrent.futures.ThreadPoolExecutor(max_workers=s2["parallel"]) as pool:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()
    models = {}
    for variant in s2["variants"]:
        source = VARIANTS[variant].get("same_as") if VARIANTS[variant].get("same_as") in s2["variants"] else variant
        models[variant] = {seed: root / source / f"seed{seed}" / "final" for seed in s2["seeds"]}
    return models


def settings_for(profile: dict, n_visual: int) -> list[dict]:
    ev = profile["eval"]
    settings = [{"method": "none", "keep": n_visual, "fraction": 1.0}]
    for fraction in ev["fractions"]:
        if fraction < 1.0:
            keep = max(1, int(round(fraction * n_visual)))
            settings += [{"method": m, "keep": keep, "layer": profile["layer"], "fraction": fraction}
                         for m in ev["methods"]]
    return settings


def eval_model(profile: dict, work: pathlib.Path, name: str, model_dir: pathlib.Path, items: list[dict],
               settings: list[dict]) -> list[dict]:
    """Cached test evaluation of one model: per setting, accuracy, families and per-item correctness."""
    cache = work / "eval" / profile["preset"] / f"{name}.json"  # per preset: no stale cache across presets
    if cache.is_file():
        return json.loads(cache.read_text())
    from epic_ext.eval import normalize_answer

    started = time.perf_counter()
    rows = _evaluate(model_dir, items, [{k: v for k, v in s.items() if k != "fraction"} for s in settings], profile)
    out = []
    for setting, row in zip(settings, rows):
        correct = [int(normalize_answer(p) == normalize_answer(i["answer"])) for p, i in zip(row["predictions"], items)]
        out.append({**setting, "accuracy": row["accuracy"], "families": row["families"], "correct": correct,
                    "prefill_gflops": 1000 * row["prefill_tflops_exact"], "kv_mb": row["kv_mb"]})
    write_json(cache, out, indent=None)
    log(f"eval: {name} in {time.perf_counter() - started:.0f} s: " + ", ".join(
        f"{r['method']}@{r['keep']}={r['accuracy']:.1f}" for r in out if r["method"] in ("none", profile["eval"]["primary"])))
    return out


def bootstrap_ci(differences: list[float], seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean of per-item paired differences and its 95% percentile-bootstrap interval (resampling items)."""
    rng = random.Random(seed)
    n = len(differences)
    mean = sum(differences) / n
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return mean, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def summarise(profile: dict, results: dict, gap: dict) -> dict:
    """results: model name -> {seed -> rows}. Returns the JSON report."""
    import statistics

    summary = {"profile": profile["name"], "preset": profile["preset"], "zero_shot_gap": gap, "variants": {},
               "comparisons": []}
    for name, by_seed in results.items():
        rows = list(by_seed.values())
        table = []
        for i, setting in enumerate(rows[0]):
            accs = [r[i]["accuracy"] for r in rows]
            families = {f: statistics.mean(r[i]["families"][f] for r in rows) for f in setting["families"]}
            table.append({k: setting[k] for k in ("method", "keep", "fraction")} | {
                "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seeds": len(accs), "families": families, "prefill_gflops": setting["prefill_gflops"],
                "kv_mb": setting["kv_mb"]})
        summary["variants"][name] = table
    for better, base in COMPARISONS:
        if better not in results or base not in results:
            continue
        for i, setting in enumerate(next(iter(results[better].values()))):
            if setting["method"] not in ("none", profile["eval"]["primary"]):
                continue
            diffs = []
            for seed, rows in results[better].items():
                other = results[base].get(seed) or next(iter(results[base].values()))
                diffs += [100.0 * (a - b) for a, b in zip(rows[i]["correct"], other[i]["correct"])]
            mean, low, high = bootstrap_ci(diffs)
            summary["comparisons"].append({"better": better, "base": base, "method": setting["method"],
                                           "keep": setting["keep"], "difference": mean, "ci95": [low, high]})
    return summary


def write_report(profile: dict, summary: dict, machine: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{profile['name']}-{profile['preset']}"
    (RESULTS / f"ablation_{name}.json").write_text(json.dumps(summary, indent=1))
    primary = profile["eval"]["primary"]
    base = ("the pretrained demo model" if profile.get("base") == "demo_model" else "the stage-1 model")
    labels = {k: v["label"] for k, v in VARIANTS.items()} | {"zero_shot": f"{base}, zero-shot (no stage 2)"}
    lines = [f"# EPIC ablation, profile `{name}`", "", f"Machine: {machine}. Generated by `make ablation "
             f"PROFILE={profile['name']} CONSTANTS={profile['preset']}` ({time.strftime('%Y-%m-%d')}); raw numbers "
             f"in `ablation_{name}.json`.", "", f"TCD constants: preset `{profile['preset']}` "
             f"({profile['constants_description']}); distillation weight "
             + (f"{profile['lam']} (the profile's)" if profile.get("lam") is not None else "the preset's") + ".", ""]
    gap = summary["zero_shot_gap"]
    lines += [f"Zero-shot gap of {base} ({primary}, {gap['keep']} of {gap['n_visual']} visual tokens at "
              f"layer {profile['layer']}): {gap['gap']:.1f} points ({gap['full']:.1f}% -> {gap['compressed']:.1f}%)."
              + (" **Under 10 points: this setting cannot separate the variants; read the table as uninformative.**"
                 if gap["gap"] < 10 else ""), ""]
    settings = [(r["method"], r["keep"]) for r in next(iter(summary["variants"].values()))]
    header = "| variant | " + " | ".join(f"{m} {k}" if m != "none" else f"all {k}" for m, k in settings) + " |"
    lines += [f"Test accuracy (%), mean ± std over seeds; compression at layer {profile['layer']}.", "", header,
              "|" + "---|" * (len(settings) + 1)]
    for variant, table in summary["variants"].items():
        cells = [f"{r['mean']:.1f} ± {r['std']:.1f}" for r in table]
        lines.append(f"| {labels.get(variant, variant)} | " + " | ".join(cells) + " |")
    families = sorted(next(iter(summary["variants"].values()))[0]["families"])
    target = summary["zero_shot_gap"]["keep"]
    lines += ["", f"Per question family (%), all tokens / {primary} {target}:", "",
              "| variant | " + " | ".join(families) + " |", "|" + "---|" * (len(families) + 1)]
    for variant, table in summary["variants"].items():
        full_row = next(r for r in table if r["method"] == "none")
        comp_row = next(r for r in table if r["method"] == primary and r["keep"] == target)
        lines.append(f"| {labels.get(variant, variant)} | " + " | ".join(
            f"{full_row['families'][f]:.1f} / {comp_row['families'][f]:.1f}" for f in families) + " |")
    lines += ["", f"Paired differences (percentage points, per test item, {primary} and full tokens), "
              "95% bootstrap intervals over items:", "", "| comparison | setting | difference | 95% CI |",
              "|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(f"| {labels.get(c['better'], c['better'])} - {labels.get(c['base'], c['base'])} | "
                     f"{c['method']} {c['keep']} | {c['difference']:+.1f} | [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] |")
    (RESULTS / f"ablation_{name}.md").write_text("\n".join(lines) + "\n")
    # bench/results/ablation.md gathers every profile's report in one place
    parts = ["# EPIC ablations in miniature", "", "One section per profile; each also stands alone as "
             "`ablation_<profile>.md` with its `.json` and `.png`.", ""]
    for report in sorted(RESULTS.glob("ablation_*.md")):
        parts += [report.read_text().replace("# EPIC ablation, profile", "## Profile", 1),
                  f"![accuracy vs kept tokens]({report.stem}.png)", ""]
    (RESULTS / "ablation.md").write_text("\n".join(parts) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, table in summary["variants"].items():
        rows = [r for r in table if r["method"] in ("none", primary)]
        ax.errorbar([r["keep"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                    marker="o", capsize=3, label=labels.get(variant, variant))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"visual tokens kept ({primary}, layer {profile['layer']})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"EPIC ablation ({name} profile)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"ablation_{name}.png", dpi=120)
    log(f"report: {RESULTS / f'ablation_{name}.md'} and .png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--schedule-constants", choices=PRESETS,
                        help="TCD constant preset of stage 2 (default: the profile's schedule_constants)")
    parser.add_argument("--work-dir", help="cache of every stage (default build/ablation/<profile>)")
    parser.add_argument("--results-dir", help="where the report goes (default bench/results)")
    args = parser.parse_args(argv)
    global RESULTS
    if args.results_dir:
        RESULTS = pathlib.Path(args.results_dir)
    profile = load_profile(args.profile)
    resolve_base(profile)
    profile["preset"] = args.schedule_constants or profile.get("schedule_constants", "release")
    if profile["preset"] not in PRESETS:
        raise SystemExit(f"profile {args.profile}: schedule_constants must be one of {PRESETS}")
    from epic_ext.schedules import resolve_constants

    constants = resolve_constants(profile["preset"], profile["stage2"]["train_method"])
    profile["constants_description"] = constants.describe()
    log(f"stage 2 TCD constants: {profile['constants_description']}")
    work = pathlib.Path(args.work_dir or ROOT / "build" / "ablation" / profile["name"])
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = stage_data(profile, work)
    base = stage1(profile, work, splits)
    test = split_items(splits, "test", work / "data")
    n_visual = (profile["task"]["image_size"] // 14) ** 2
    settings = settings_for(profile, n_visual)
    zero = eval_model(profile, work, "zero_shot", base, test, settings)
    primary = profile["eval"]["primary"]
    target_keep = max(1, int(round((1 - profile["ratio"]) * n_visual)))
    full = next(r for r in zero if r["method"] == "none")["accuracy"]
    compressed = next(r for r in zero if r["method"] == primary and r["keep"] == target_keep)["accuracy"]
    gap = {"full": full, "compressed": compressed, "gap": full - compressed, "keep": target_keep, "n_visual": n_visual}
    log(f"zero-shot gap ({primary}, keep {target_keep}/{n_visual}): {gap['gap']:.1f} points"
        + ("  -- under 10 points: this setting is uninformative" if gap["gap"] < 10 else ""))
    models = stage2(profile, work, splits, base)
    results = {"zero_shot": {0: zero}}
    for variant, by_seed in models.items():
        results[variant] = {seed: eval_model(profile, work, f"{variant}_seed{seed}", path, test, settings)
                            for seed, path in by_seed.items()}
    import platform

    import torch

    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU")
    write_report(profile, summarise(profile, results, gap), machine)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min (this run; cached stages not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
