"""`python -m epic_ext.train`: EPIC training of a supported multimodal model with DeepSpeed (see --help).

Preflight checks every setting and resolves the run before DeepSpeed starts and the weights load; the loop trains,
checkpoints and exports; with --eval-data the export is evaluated (epic_ext.eval) at the end. The demo is
`python -m epic_ext.demo`.
"""

from __future__ import annotations

import os
import time

from ..cli import configure_logging, describe_skips, run_main
from .config import TrainConfig, parse_args

# --eval-keep's default for a per-image budget: all, 1/2, 1/4 and 1/8 of the visual tokens
POST_RUN_FRACTIONS = ((1, 1), (1, 2), (1, 4), (1, 8))


def run_eval(cfg: TrainConfig, model_dir: str) -> list[dict]:
    """Exact-match evaluation of the exported model on --eval-data (the same skip policy as training)."""
    import torch  # noqa: PLC0415

    from ..cli import check_skipped, load_records_option  # noqa: PLC0415
    from ..eval import (check_video_frames, collect_items, compression_settings, default_keeps, evaluate,  # noqa: PLC0415
                        format_rows)
    from ..models.families import family_of_checkpoint  # noqa: PLC0415

    records = load_records_option(cfg.eval_data, "--eval-data")
    family = family_of_checkpoint(model_dir)
    processor = family.load_processor(model_dir)
    items, skipped = collect_items(records, cfg.image_folder, on_bad_image=cfg.on_bad_image,
                                   videos=getattr(processor, "videos", False))
    check_skipped(skipped, len(records), cfg.max_skip_fraction, image_folder=cfg.image_folder,
                  what="evaluation records")
    check_video_frames(family, items, "--eval-data")
    model = family.load_model(model_dir, torch.float32, attn_implementation=cfg.attn_implementation)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    # per-sample budgets: preflight made --eval-keep required
    keeps = cfg.eval_keep or default_keeps(family, model.config, POST_RUN_FRACTIONS)
    settings = compression_settings(family, model.config, keeps, layer=cfg.layer)
    rows = evaluate(model, processor, items, settings, batch_size=32, max_new_tokens=3, device=device,
                    seed=cfg.seed)
    print(f"\nexact-match accuracy on {cfg.eval_data} ({len(items)} items), compression at layer {cfg.layer}:")
    if sum(skipped.values()):
        print(f"skipped evaluation records: {describe_skips(skipped)}")
    print(format_rows(rows))
    return rows


def _main(argv: list[str] | None) -> int:
    configure_logging()
    cfg = parse_args(argv)
    from .preflight import preflight  # noqa: PLC0415

    run = preflight(cfg)  # paths, model config, layers, records, resume: before DeepSpeed and the weights
    if cfg.dry_run:
        from .estimate import report  # noqa: PLC0415

        print(report(run, cfg.num_gpus or run.world_size, cfg.num_nodes))
        return 0
    from .loop import train  # noqa: PLC0415

    started = time.perf_counter()
    summary = train(run)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        last = summary["last"]
        print(f"\ntrained {summary['total_steps']} steps in {time.perf_counter() - started:.0f} s; last step: "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
        if summary["skipped"]:
            print(f"skipped samples: {describe_skips(summary['skipped'])}")
        if "export" in summary:
            print(f"exported to {summary['export']}")
            if cfg.eval_data:
                run_eval(cfg, summary["export"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m epic_ext.train`: a user error is one line on stderr and exit status 2."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
