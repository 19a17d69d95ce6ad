"""The frozen run object of `python -m epic_ext.train`: the command line's settings with everything derived from
them resolved once (the schedule constants and the distillation weight and temperature they imply, the model's
family and depth, the world size, ZeRO stage and records). Preflight builds it before anything heavy starts; the
loop, the schedule and the checkpoints read it, and nothing resolves the constants again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..models.families import Family
from ..schedules import ResolvedConstants, ScheduleConfig, resolve_constants
from .config import TrainConfig


@dataclass(frozen=True)
class Run:
    """One training run, resolved.

    Attributes:
        cfg: the settings, --lam / --tau filled from the schedule constants when not given (what the run uses,
            records in train_config.json and compares on resume).
        constants: the resolved --schedule-constants.
        family: the checkpoint's family (epic_ext.models.families).
        num_layers: the language model's decoder layers.
        world_size: training processes.
        zero_stage: DeepSpeed ZeRO stage of the run's DeepSpeed config.
        records: the training records, read and checked once.
    """

    cfg: TrainConfig
    constants: ResolvedConstants
    family: Family
    num_layers: int
    world_size: int
    zero_stage: int
    records: tuple[dict, ...]

    @classmethod
    def resolve(cls, cfg: TrainConfig, *, family: Family, num_layers: int, world_size: int, zero_stage: int,
                records) -> Run:
        """Resolves cfg's schedule constants (ValueError for a bad spec) and fills --lam / --tau from them."""
        constants = resolve_constants(cfg.schedule_constants, cfg.method)
        cfg = dataclasses.replace(cfg, lam=cfg.resolved_lam(constants), tau=cfg.resolved_tau(constants))
        return cls(cfg=cfg, constants=constants, family=family, num_layers=num_layers, world_size=world_size,
                   zero_stage=zero_stage, records=tuple(records))

    def schedule(self) -> ScheduleConfig:
        """The compression schedule of the run (epic_ext.schedules), built against the model's depth."""
        cfg = self.cfg
        return ScheduleConfig(kind=cfg.schedule, num_layers=self.num_layers, layer=cfg.layer,
                              min_layer=min(cfg.min_layer, self.num_layers), target_ratio=cfg.ratio,
                              teacher_ratio=cfg.teacher_ratio, seed=cfg.seed, **self.constants.schedule)
