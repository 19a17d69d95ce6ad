"""`python -m epic_ext.train`: EPIC training of a LLaVA model with DeepSpeed (see --help).

`--demo` is the embedded default (epic_ext.train.demo): the pretrained tiny LLaVA committed in the package, its
accuracy at full and compressed visual tokens on the generated shapes task, a short EPIC TCD run from it through
exactly the path a real run takes (from_pretrained, the LLaVA-format JSON, DeepSpeed), and the same table after.
"""

from __future__ import annotations

import logging
import os
import time

from ..cli import describe_skips, run_main
from .config import TrainConfig, parse_args


def run_eval(cfg: TrainConfig, model_dir: str) -> list[dict]:
    import torch  # noqa: PLC0415

    from ..cli import check_skipped, load_records_option  # noqa: PLC0415
    from ..eval import collect_items, evaluate, format_rows, load_processor  # noqa: PLC0415
    from ..models.families import family_of, load_model  # noqa: PLC0415

    # the same skip policy as training: bad records are skipped and counted, too many of them stop the run
    records = load_records_option(cfg.eval_data, "--eval-data")
    items, skipped = collect_items(records, cfg.image_folder, on_bad_image=cfg.on_bad_image)
    check_skipped(skipped, len(records), cfg.max_skip_fraction, image_folder=cfg.image_folder,
                  what="evaluation records")
    from transformers import AutoConfig  # noqa: PLC0415

    family = family_of(AutoConfig.from_pretrained(model_dir))
    model = load_model(model_dir, family, torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    processor = load_processor(model_dir, family)
    if family.chat_template:  # per-sample budgets (preflight made --eval-keep required)
        settings = [{"method": "none", "keep": None, "layer": cfg.layer}]
        settings += [{"method": m, "keep": k, "layer": cfg.layer} for k in cfg.eval_keep
                     for m in ("fastv", "dart", "random")]
    else:
        visual = model.config.image_seq_length
        keeps = cfg.eval_keep or [visual, visual // 2, visual // 4, visual // 8]
        settings = [{"method": "fastv", "keep": visual, "layer": cfg.layer}]
        settings += [{"method": m, "keep": k, "layer": cfg.layer} for k in keeps if k < visual
                     for m in ("fastv", "dart", "random")]
    rows = evaluate(model, processor, items, settings, batch_size=32, max_new_tokens=3, device=device,
                    seed=cfg.seed)
    print(f"\nexact-match accuracy on {cfg.eval_data} ({len(items)} items), compression at layer {cfg.layer}:")
    if sum(skipped.values()):
        print(f"skipped evaluation records: {describe_skips(skipped)}")
    print(format_rows(rows))
    return rows


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = parse_args(argv)
    if cfg.demo:
        from .demo import run_demo  # noqa: PLC0415

        return run_demo(cfg)
    from .preflight import preflight  # noqa: PLC0415

    checked = preflight(cfg)  # paths, model config, layers, records, resume: before DeepSpeed and the weights
    from .loop import train  # noqa: PLC0415

    started = time.perf_counter()
    summary = train(cfg, checked.records)
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
