"""`python -m epic_ext.train`: EPIC training of a LLaVA model with DeepSpeed (see --help).

`--demo` is the embedded default: it writes a synthetic visual QA set (shapes, colours, counts, positions; images
drawn in code), builds a tiny LLaVA from config with an offline tokenizer and processor, saves both as a llava-hf
checkpoint directory, and then runs exactly the path a real run takes (from_pretrained on that directory, the
LLaVA-format JSON, DeepSpeed, TCD) before evaluating the exported model at full and compressed visual tokens.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

from ..cli import describe_skips, run_main
from .config import TrainConfig, parse_args

DEMO_IMAGE_SIZE = 112  # 64 visual tokens of 14 px
DEMO_SETTINGS = dict(method="fastv", schedule="tcd", layer=1, min_layer=1, lam=0.7, tau=1.0, lr=7e-4,
                     micro_batch_size=16, grad_accum=1, warmup_ratio=0.05, freeze_vision=False, zero=2, save_steps=0,
                     max_length=256, padding_side="right")


def prepare_demo(cfg: TrainConfig) -> TrainConfig:
    """Writes the demo data and the tiny model + processor under cfg.output_dir; returns the run's config."""
    import torch  # noqa: PLC0415

    from ..models.tiny import build_tiny_llava  # noqa: PLC0415
    from .demo_data import build_tiny_processor, demo_vocabulary, make_shapes_task  # noqa: PLC0415

    out = pathlib.Path(cfg.output_dir)
    data_dir, model_dir = out / "demo_data", out / "demo_model"
    image_size = int(os.environ.get("EPIC_DEMO_IMAGE_SIZE", DEMO_IMAGE_SIZE))
    splits = make_shapes_task(data_dir, n_train=1200, n_val=100, n_test=200, seed=cfg.seed, image_size=image_size)
    if torch.distributed.is_initialized() is False and int(os.environ.get("RANK", "0")) == 0:
        processor = build_tiny_processor(demo_vocabulary(), image_size=image_size, save_dir=model_dir)
        tokenizer = processor.tokenizer
        model = build_tiny_llava(seed=cfg.seed, vocab_size=len(tokenizer),
                                 image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                 pad_token_id=tokenizer.pad_token_id, hidden=64, text_layers=4,
                                 image_size=image_size)
        model.save_pretrained(str(model_dir))
    else:  # the checks before start-up read the model's config: wait for rank 0 to write it (up to 5 minutes)
        deadline = time.monotonic() + 300
        while not (model_dir / "config.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
    # demo settings replace defaults only: anything given on the command line wins
    defaults = json.loads(TrainConfig().to_json())
    values = json.loads(cfg.to_json())
    values.update({k: v for k, v in DEMO_SETTINGS.items() if values[k] == defaults[k]})
    values.update(model=str(model_dir), data=splits["train"], image_folder=str(data_dir), demo=True,
                  max_steps=cfg.demo_steps, eval_data=cfg.eval_data or splits["test"],
                  eval_keep=cfg.eval_keep)
    demo_cfg = TrainConfig(**values)
    demo_cfg.validate()
    return demo_cfg


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
        cfg = prepare_demo(cfg)
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
