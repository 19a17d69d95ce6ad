"""The DeepSpeed training loop of `python -m epic_ext.train`.

One process or many (the `deepspeed` launcher or torchrun; multi-node through the same launchers). Each optimizer
step: the schedule gives the student's and teacher's compression, GRAD_ACCUM micro-batches are drawn, their
supervised tokens are counted over every rank (so the loss is normalised as for one big batch), and each
micro-batch runs epic_ext.distill.distillation_loss through the DeepSpeed engine.

Checkpoints hold the DeepSpeed engine state plus the sampler position, the RNG states of every rank and the
step; resuming continues with exactly the batches, schedule draws and losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import random
import socket
import time

import numpy as np
import torch

from ..cli import UsageError, check_skipped, describe_skips
from ..data.llava import collate
from ..data.records import SKIP_REASONS
from ..distill import DistillConfig, distillation_loss, shifted_targets, visual_mask
from ..models import _hf, apply_compression
from ..models.families import parameter_parts
from ..schedules import compression_at
from . import checkpoint, faults, locks
from .config import TrainConfig, deepspeed_config
from .run import Run
from .sampling import GroupedSampler, Sampler, estimate_lengths

_logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- distributed --
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Initialises torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU). Returns (rank, world, device)."""
    import deepspeed  # noqa: PLC0415

    if "RANK" not in os.environ:  # a plain `python -m epic_ext.train`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    use_cuda = torch.cuda.is_available()
    faults.install()  # testing aid: EPIC_EXT_KILL_AT (epic_ext.train.faults)
    locks.clear_stale_build_locks()  # DeepSpeed builds its ops under torch's lock files: a stale one hangs it
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _all_reduce(value: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


# ------------------------------------------------------------------------------------------------------ data --
# ---------------------------------------------------------------------------------------------------- model --
def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups per part (vision / projector / LM, each with its learning rate, decayed and not). Full
    fine-tuning: the freeze options set requires_grad per part. LoRA: peft has set it (adapters and trained copies
    only), and the groups take the parameters that require gradients."""
    params = parameter_parts(model)
    parts = {
        "vision": (params["vision"], cfg.freeze_vision, cfg.vision_lr or cfg.lr),
        "projector": (params["projector"], cfg.freeze_projector, cfg.projector_lr or cfg.lr),
        "llm": (params["llm"], cfg.freeze_llm, cfg.lr),
    }
    groups = []
    for name, (params, frozen, lr) in parts.items():
        if cfg.lora_r is not None:
            params = [p for p in params if p.requires_grad]
            frozen = not params
        for p in params:
            p.requires_grad_(not frozen)
        if frozen:
            continue
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for subset, wd, suffix in ((decay, cfg.weight_decay, ""), (no_decay, 0.0, "_no_decay")):
            if subset:
                groups.append({"params": subset, "lr": lr, "weight_decay": wd, "name": name + suffix})
    if not groups:
        raise ValueError("every part of the model is frozen: nothing to train")
    return groups


def _lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = max(int(math.ceil(warmup_ratio * total_steps)), 0)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_dataset(run: Run, processor):
    """The training dataset of the run's family (epic_ext.data: LlavaDataset or ChatDataset)."""
    cfg = run.cfg
    return run.family.dataset(list(run.records), cfg.image_folder, processor, max_length=cfg.max_length,
                              pad_to_square=cfg.pad_to_square, on_bad_image=cfg.on_bad_image)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------------------------------------------ train --
def _global_grad_norm(engine) -> float | None:
    """L2 norm of the gradients the optimizer step is about to use (reduced over ranks under ZeRO 0, where
    DeepSpeed does not report one); None when no parameter holds a gradient."""
    squares = [p.grad.detach().float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else None


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drops the rows of metrics.jsonl after `last_step` (written after the checkpoint a run resumes from), and
    a last row cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    checkpoint.write_atomic(path, "".join(line + "\n" for line in kept))


def _skip_check(dataset, cfg: TrainConfig, device) -> None:
    """--max-skip-fraction over the samples every rank has built (the same decision on every rank)."""
    counts = torch.tensor([float(dataset.skipped.get(r, 0)) for r in SKIP_REASONS] + [float(dataset.visited)],
                          device=device)
    counts = _all_reduce(counts).tolist()
    check_skipped(dict(zip(SKIP_REASONS, (int(c) for c in counts[:-1]))), int(counts[-1]), cfg.max_skip_fraction,
                  image_folder=cfg.image_folder, what="training samples")


def train(run: Run) -> dict:
    """Runs the training; returns a summary (last metrics, skipped samples, export path).

    Args:
        run: the resolved run (epic_ext.train.preflight builds it).

    Raises:
        UsageError: more than cfg.max_skip_fraction of the samples seen were skipped (before the export).
    """
    import deepspeed  # noqa: PLC0415

    cfg, constants = run.cfg, run.constants
    rank, world, device = init_distributed()
    out_dir = pathlib.Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(out_dir / "train_config.json", cfg.to_json())
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model = run.family.load_model(cfg.model, torch.bfloat16 if cfg.bf16 else torch.float32,
                                  attn_implementation=cfg.attn_implementation)
    if rank == 0:
        _logger.info("language model attention: %s", _hf.text_attention_implementation(model.config.get_text_config()))
    processor = run.family.load_processor(cfg.model)
    if cfg.gradient_checkpointing:
        _hf.enable_activation_checkpointing(model, use_reentrant=False)
        model.config.use_cache = False
    if cfg.lora_r is not None:
        from . import lora  # noqa: PLC0415

        lora.apply_lora(model, cfg)  # in place: `model` keeps its class, with the adapters inside
        if rank == 0:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            _logger.info("LoRA r %d on %s: %d trainable parameters of %d", cfg.lora_r,
                         ", ".join(lora.targets_of(cfg)), trainable, sum(p.numel() for p in model.parameters()))
    groups = _param_groups(model, cfg)
    handle = apply_compression(model, cfg.method, layer=cfg.layer, ratio=cfg.ratio)
    dataset = build_dataset(run, processor)
    pad_id = processor.tokenizer.pad_token_id
    if cfg.group_by_length:  # every rank estimates the same lengths from the same records
        lengths, multimodal = estimate_lengths(run.records, run.family.visual_tokens_per_image(model.config))
        sampler = GroupedSampler(lengths, multimodal, rank, world, cfg.seed, cfg.micro_batch_size)
        if rank == 0:
            _logger.info("--group-by-length: %s", sampler.describe())
    else:
        sampler = Sampler(len(dataset), rank, world, cfg.seed)
    per_step = cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = max(sampler.samples_per_epoch // per_step, 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(int(math.ceil(cfg.epochs * steps_per_epoch)), 1)
    schedule = run.schedule()
    if rank == 0:
        _logger.info("schedule %s, TCD constants %s; distillation lam %g, tau %g", cfg.schedule,
                     constants.describe(), cfg.lam, cfg.tau)
    distill = DistillConfig(lam=cfg.lam, tau=cfg.tau)

    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, cfg.warmup_ratio,
                                                                        cfg.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=deepspeed_config(cfg, world))
    start_step = 0
    if cfg.resume:
        auto = cfg.resume == "auto"
        start_step = checkpoint.load(engine, sampler, ckpt_root if auto else pathlib.Path(cfg.resume), rank,
                                     auto=auto)

    writer = None
    metrics_file = None
    progress = None
    if rank == 0:
        # the logs read as one run: rows and events after the step this run starts from are dropped
        _truncate_metrics(out_dir / "metrics.jsonl", start_step)
        metrics_file = (out_dir / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            _logger.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        from tqdm.auto import tqdm  # noqa: PLC0415

        progress = tqdm(total=total_steps, initial=start_step, desc=f"{cfg.schedule} {cfg.method}", unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    def next_batch():
        drawn = 0
        while True:
            batch = collate([dataset[i] for i in sampler.take(cfg.micro_batch_size)], pad_id,
                            padding_side=cfg.padding_side)
            if batch is not None:
                return batch
            drawn += cfg.micro_batch_size
            if drawn > len(dataset) + cfg.micro_batch_size:  # a whole pass without one usable sample
                raise UsageError(f"every sample this process drew was skipped ({describe_skips(dataset.skipped)})")

    last = {}
    engine.train()
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        comp = compression_at(step, total_steps, schedule)
        generator = getattr(handle.settings.compressor, "generator", None)
        if generator is not None:
            generator.manual_seed(cfg.seed * 7919 + step)  # random compression: resume-exact
        micro_batches = [next_batch() for _ in range(cfg.grad_accum)]
        local_tokens = sum(int((shifted_targets(b["labels"]).masked_fill(visual_mask(handle, b["input_ids"]), -100)
                                != -100).sum()) for b in micro_batches)
        global_tokens = float(_all_reduce(torch.tensor(float(local_tokens), device=device)))
        normalizer = global_tokens / (world * cfg.grad_accum)
        sums = torch.zeros(5, device=device)
        seen_tokens = 0
        own_grad_norm = None
        for batch in micro_batches:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            for key in ("pixel_values", "pixel_values_videos"):
                if batch.get(key) is not None:
                    batch[key] = batch[key].to(engine.module.dtype)
            out = distillation_loss(engine.module, handle, batch, comp, distill, normalizer)
            engine.backward(out["loss"])
            if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
                own_grad_norm = _global_grad_norm(engine)  # reduced gradients, before clipping and the step
            engine.step()
            mask = batch["attention_mask"]
            sums += torch.stack([out["sft_sum"].float(), out["kd_sum"].float(), out["tokens"].float(),
                                 (mask == 0).sum().float(), torch.tensor(float(mask.numel()), device=device)])
            seen_tokens += int(batch["attention_mask"].sum())
        sums = _all_reduce(sums)
        tokens = max(float(sums[2]), 1.0)
        sft, kd = float(sums[0]) / tokens, float(sums[1]) / tokens
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = own_grad_norm
        elapsed = time.perf_counter() - started
        last = {"step": step + 1, "sft_loss": sft, "kd_loss": kd, "loss": (1 - cfg.lam) * sft + cfg.lam * kd,
                "student_ratio": comp.student_ratio, "teacher_ratio": comp.teacher_ratio,
                "student_layer": comp.student_layer, "teacher_layer": comp.teacher_layer,
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": seen_tokens * world / elapsed, "peak_memory_mb": _peak_memory_mb(device),
                "step_time_s": elapsed, "padding_fraction": float(sums[3]) / max(float(sums[4]), 1.0)}
        if rank == 0:
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.4f}", ratio=f"{comp.student_ratio:.2f}",
                                 layer=comp.student_layer)
            if (step + 1) % cfg.log_steps == 0 or step + 1 == total_steps:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for key, value in last.items():
                        if key != "step" and value is not None:
                            writer.add_scalar(f"train/{key}", value, step + 1)
            faults.reached("train.step")
        done = step + 1 == total_steps
        if (cfg.save_steps and (step + 1) % cfg.save_steps == 0) or (done and cfg.save_steps):
            checkpoint.save(engine, sampler, ckpt_root, step + 1, rank, cfg.keep_checkpoints, cfg, world)
        if cfg.stop_after_steps and step + 1 == cfg.stop_after_steps:
            _logger.warning("stopping after %d steps as asked (--stop-after-steps)", step + 1)
            break
    if rank == 0:
        progress.close()
        metrics_file.close()
        if writer is not None:
            writer.close()
    summary = {"last": last, "skipped": dict(dataset.skipped), "total_steps": total_steps}
    if rank == 0 and sum(dataset.skipped.values()):
        _logger.warning("skipped samples: %s", dict(dataset.skipped))
    _skip_check(dataset, cfg, device)
    finished = not (cfg.stop_after_steps and cfg.stop_after_steps < total_steps)
    if cfg.export and finished:
        summary["export"] = str(_export(engine, handle, processor, out_dir / "final", cfg, rank, run.family))
    return summary


def _export(engine, handle, processor, target: pathlib.Path, cfg: TrainConfig, rank: int, family) -> pathlib.Path:
    """save_pretrained of the trained weights (gathered under ZeRO-3) and the processor, loadable by the family's
    class's from_pretrained / AutoProcessor.from_pretrained (chat-template families: the checkpoint's processor
    files, copied). LoRA: the adapter (PeftModel.from_pretrained), or with --merge-lora the merged model and the
    adapter in target/adapter (epic_ext.train.lora.export)."""
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if rank == 0:
        handle.remove()  # export the plain model class and config
        model = engine.module
        with contextlib.suppress(AttributeError):
            model.config.use_cache = True
        # written beside the target and moved into place when complete: a kill leaves no half-written final/
        staging = checkpoint.staging_dir(target)
        if cfg.lora_r is not None:
            from . import lora  # noqa: PLC0415

            trained = lora.trained_model(family, cfg, {k: v.detach().cpu() for k, v in state_dict.items()},
                                         torch.bfloat16 if cfg.bf16 else torch.float32)
            lora.export(trained, processor, staging, cfg.merge_lora)
            faults.reached("export.weights")
        else:
            model.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
            faults.reached("export.weights")
            processor.save_pretrained(str(staging))
        checkpoint.publish_dir(staging, target)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return target
