"""Checks of `python -m epic_ext.train` that run before DeepSpeed starts and the model loads: paths, the model's
config.json, layers against the model's depth, the records (JSON, skipped-sample share), the DeepSpeed config and
a resume's compatibility with its checkpoint. Each failure is a UsageError naming the option. What the checks
resolve (constants, family, depth, world, records) becomes the run's frozen `Run` (run.py)."""

from __future__ import annotations

import os

from ..cli import UsageError, check_attn_implementation_option, check_skipped, load_model_config, load_records_option
from ..compress import get_compressor
from ..data.records import ImageLoadError, image_names, scan_records, video_frames
from ..models.families import TRAINABLE, family_of
from .checkpoint import check_resume
from .config import TrainConfig, deepspeed_config
from .run import Run


def check_layers(cfg: TrainConfig, num_layers: int) -> None:
    """--layer (and --min-layer for the lcd schedules) against the model's decoder layers and the method."""
    low = get_compressor(cfg.method).min_layer
    if not low <= cfg.layer < num_layers:
        raise UsageError(f"--layer must be in [{low}, {num_layers - 1}] for --method {cfg.method} on this model "
                         f"({num_layers} decoder layers), got {cfg.layer}")
    if "lcd" in cfg.schedule and not low <= cfg.min_layer < num_layers:
        raise UsageError(f"--min-layer must be in [{low}, {num_layers - 1}] for --schedule {cfg.schedule} on this "
                         f"model ({num_layers} decoder layers), got {cfg.min_layer}")


def check_lora_targets(cfg: TrainConfig, family, config) -> None:
    """peft importable, and --lora-target against the linear layers of the model's language model (built on the
    meta device)."""
    import importlib  # noqa: PLC0415

    from . import lora  # noqa: PLC0415

    try:
        importlib.import_module("peft")
    except ImportError:
        raise UsageError("--lora-r needs the peft package: pip install 'epic_ext[train]' (or pip install peft)") from None

    try:
        lora.check_targets(lora.meta_model(family, config), lora.targets_of(cfg))
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_schedule(run: Run) -> None:
    """The schedule as the training loop will build it (e.g. ICD's stage layers must fit between --min-layer and
    the model's depth), so a bad combination stops here, not after DeepSpeed starts."""
    from ..schedules import icd_layers  # noqa: PLC0415

    try:
        schedule = run.schedule()
        if run.cfg.schedule == "icd":
            icd_layers(schedule)
    except ValueError as error:
        raise UsageError(f"--schedule {run.cfg.schedule} on this model ({run.num_layers} decoder layers): "
                         f"{error}") from error


def check_grouping(records, world_size: int, micro_batch_size: int) -> None:
    """--group-by-length draws megabatches of one modality (world * micro-batch samples): a modality with fewer
    records than that would never be trained on."""
    megabatch = world_size * micro_batch_size
    multimodal = sum(1 for r in records if image_names(r) or video_frames(r))
    for name, count in (("text-only", len(records) - multimodal), ("image/video", multimodal)):
        if 0 < count < megabatch:
            raise UsageError(f"--group-by-length: {count} {name} records, fewer than one batch of their own "
                             f"({world_size} processes x --micro-batch-size {micro_batch_size}); they would never "
                             "be drawn: lower --micro-batch-size or leave out --group-by-length")


def preflight(cfg: TrainConfig) -> Run:
    """Runs every check that needs no model weights and no process group; returns the resolved run.

    Raises:
        UsageError: the first problem found, naming its option.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    import torch  # noqa: PLC0415

    check_attn_implementation_option(cfg.attn_implementation, "cuda" if torch.cuda.is_available() else "cpu",
                                     torch.bfloat16 if cfg.bf16 else torch.float32, dtype_hint="--bf16")
    try:
        ds = deepspeed_config(cfg, world_size)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    except ValueError as error:
        raise UsageError(f"--deepspeed-config: {error}") from error
    if cfg.data and not os.path.exists(cfg.data):  # the cheapest check first
        raise UsageError(f"--data: {cfg.data} does not exist")
    config = load_model_config(cfg.model, families=TRAINABLE)
    family = family_of(config)
    num_layers = config.text_config.num_hidden_layers
    check_layers(cfg, num_layers)
    if cfg.lora_r is not None:
        check_lora_targets(cfg, family, config)
    visual = family.visual_tokens_per_image(config)
    if visual is None and cfg.eval_data and not cfg.eval_keep:
        raise UsageError(f"--eval-keep is required with --eval-data for a {family.name} model (its visual tokens "
                         "per sample vary with the image sizes): give the visual tokens kept per sample")
    if visual is not None:
        if any(keep > visual for keep in cfg.eval_keep):
            raise UsageError(f"--eval-keep values must be <= the model's {visual} visual tokens, got "
                             f"{cfg.eval_keep}")
    records = load_records_option(cfg.data, "--data")
    video_record = next((r.get("id", i) for i, r in enumerate(records) if r.get("video")), None)
    if video_record is not None and not family.videos:
        raise UsageError(f"--data: record {video_record!r} has a video; training takes video records for "
                         f"{', '.join(f.name for f in TRAINABLE.values() if f.videos)} models, not {family.name}")
    frame_counts = {len(r["video"]) for r in records if r.get("video") and isinstance(r["video"], list)}
    if family.uniform_video_frames and len(frame_counts) > 1:
        raise UsageError(f"--data: {family.title} batches videos of one frame count; the video records have "
                         f"{sorted(frame_counts)} frames: sample every video to the same number of frames")
    if cfg.eval_data:
        load_records_option(cfg.eval_data, "--eval-data")
    if len(records) < world_size:
        raise UsageError(f"--data: {len(records)} records for {world_size} processes; every process needs one")
    try:
        skipped = scan_records(records, cfg.image_folder, on_bad_image=cfg.on_bad_image)
    except (ImageLoadError, ValueError) as error:
        raise UsageError(f"--on-bad-image error: {error}") from error
    check_skipped(skipped, len(records), cfg.max_skip_fraction, image_folder=cfg.image_folder,
                  what="training records")
    if cfg.group_by_length:
        check_grouping(records, world_size, cfg.micro_batch_size)
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    run = Run.resolve(cfg, family=family, num_layers=num_layers, world_size=world_size, zero_stage=zero_stage,
                      records=records)
    check_schedule(run)
    try:
        check_resume(run.cfg, world_size, zero_stage)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    return run
