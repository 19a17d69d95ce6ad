"""Command line and configuration of `python -m epic_ext.train`."""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import asdict, dataclass, field

from ..cli import HelpFormatter, Parser, UsageError, add_attn_implementation_argument
from ..compress import available as available_methods
from ..schedules import DEFAULT_PRESET, SCHEDULES, ResolvedConstants, resolve_constants

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    """Everything one run needs; saved as output_dir/train_config.json."""

    model: str | None = None  # checkpoint directory of a supported family
    data: str | None = None  # LLaVA-format JSON / JSONL
    image_folder: str = "."
    output_dir: str = "runs/epic"
    # compression and schedule
    method: str = "fastv"
    schedule: str = "tcd"
    ratio: float = 0.778  # target ratio of lcd / fixed
    layer: int = 2
    min_layer: int = 2
    teacher_ratio: float | None = 0.0  # fixed schedule's teacher
    # "paper" | "release" | JSON {"preset": ..., <schedules.CONSTANT_FIELDS>: ...} (see schedules.resolve_constants)
    schedule_constants: str | dict = DEFAULT_PRESET
    lam: float | None = None  # None: the preset's distillation weight
    tau: float | None = None  # None: the preset's temperature
    # optimisation
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    vision_lr: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    freeze_vision: bool = True
    freeze_projector: bool = False
    freeze_llm: bool = False
    # LoRA (epic_ext.train.lora): None: full fine-tuning
    lora_r: int | None = None
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.05
    lora_target: str | None = None  # comma-separated linear layers of the language model; None: lora.DEFAULT_TARGETS
    merge_lora: bool = False  # export the merged model (and the adapter in final/adapter)
    # system
    zero: int = 2
    deepspeed_config: str | None = None
    bf16: bool = False
    attn_implementation: str = "sdpa"  # the language model's (epic_ext.models.families.ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = False
    max_length: int = 2048
    pad_to_square: bool = False
    on_bad_image: str = "skip"
    max_skip_fraction: float = 0.01  # more skipped samples than this share stops the run (early and at the end)
    padding_side: str = "right"
    group_by_length: bool = False  # modality-aware length grouping of the batches (epic_ext.train.sampling)
    save_steps: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint directory, or "auto": the latest in output_dir/checkpoints
    export: bool = True
    seed: int = 0
    log_steps: int = 1
    eval_data: str | None = None
    eval_keep: list[int] = field(default_factory=list)
    stop_after_steps: int = 0  # testing aid: exit (as if killed) after this many steps
    dry_run: bool = False  # preflight, parameter counts and DeepSpeed's memory estimate, then exit
    num_gpus: int = 0  # --dry-run: GPUs per node of the planned run (0: this run's processes)
    num_nodes: int = 1  # --dry-run: nodes of the planned run

    def validate(self) -> None:
        if self.model is None or self.data is None:
            raise UsageError("--model and --data are required (the demo is `python -m epic_ext.demo`)")
        if self.method not in available_methods():
            raise UsageError(f"--method must be one of {available_methods()}, got {self.method!r}")
        if self.num_gpus < 0 or self.num_nodes < 1:
            raise UsageError(f"--num-gpus must be >= 0 and --num-nodes >= 1, got {self.num_gpus} and {self.num_nodes}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.zero not in (0, 1, 2, 3):
            raise UsageError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.on_bad_image not in ("skip", "error"):
            raise UsageError(f"--on-bad-image must be 'skip' or 'error', got {self.on_bad_image!r}")
        from ..models.families import ATTN_IMPLEMENTATIONS  # noqa: PLC0415

        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise UsageError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got "
                             f"{self.attn_implementation!r}")
        if self.padding_side not in ("left", "right"):
            raise UsageError(f"--padding-side must be 'left' or 'right', got {self.padding_side!r}")
        for name in ("micro_batch_size", "grad_accum", "log_steps", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("save_steps", "keep_checkpoints", "max_steps", "layer", "min_layer", "weight_decay",
                     "max_grad_norm", "stop_after_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for name in ("lr", "vision_lr", "projector_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if any(keep < 1 for keep in self.eval_keep):
            raise UsageError(f"--eval-keep values must be >= 1, got {self.eval_keep}")
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.teacher_ratio is not None and not 0.0 <= self.teacher_ratio < 1.0:
            raise UsageError(f"--teacher-ratio must be in [0, 1) or 'gap', got {self.teacher_ratio}")
        try:
            constants = resolve_constants(self.schedule_constants, self.method)
        except ValueError as exc:
            raise UsageError(f"--schedule-constants: {exc}") from None
        if not 0.0 <= self.resolved_lam(constants) <= 1.0:
            raise UsageError(f"--lam must be in [0, 1], got {self.lam}")
        if self.resolved_tau(constants) <= 0:
            raise UsageError(f"--tau must be > 0, got {self.tau}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise UsageError(f"--max-skip-fraction must be in [0, 1], got {self.max_skip_fraction}")
        self._validate_lora()
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UsageError("give --epochs > 0 or --max-steps > 0")

    def _validate_lora(self) -> None:
        if self.lora_r is None:
            given = [name for name in ("lora_alpha", "lora_target") if getattr(self, name) is not None]
            given += ["merge_lora"] if self.merge_lora else []
            given += ["lora_dropout"] if self.lora_dropout != TrainConfig.lora_dropout else []
            if given:
                raise UsageError(f"{', '.join('--' + n.replace('_', '-') for n in given)} need --lora-r (LoRA "
                                 "training)")
            return
        if self.lora_r < 1:
            raise UsageError(f"--lora-r must be >= 1, got {self.lora_r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UsageError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target is not None:
            names = [name.strip() for name in self.lora_target.split(",")]
            bad = [name for name in names if not name.isidentifier()]
            if bad or not names:
                raise UsageError(f"--lora-target must be comma-separated module names (e.g. q_proj,v_proj), got "
                                 f"{self.lora_target!r}")
        if self.freeze_llm:
            raise UsageError("--freeze-llm with --lora-r: the adapters are the language model's trainable part; "
                             "leave out one of them")
        if self.eval_data and not self.merge_lora:
            raise UsageError("--eval-data with --lora-r evaluates the merged model: add --merge-lora")

    def resolved_lam(self, constants: ResolvedConstants) -> float:
        """--lam, or the preset's distillation weight when not given."""
        return constants.lam if self.lam is None else self.lam

    def resolved_tau(self, constants: ResolvedConstants) -> float:
        return constants.tau if self.tau is None else self.tau

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The bundled ZeRO config (or the user's file) with "auto" entries filled from cfg."""
    path = pathlib.Path(cfg.deepspeed_config) if cfg.deepspeed_config else CONFIG_DIR / f"zero{cfg.zero}.json"
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed-config: {path} does not exist")
    ds = json.loads(path.read_text())
    fill = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum * world_size
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = cfg.bf16
    ds.pop("optimizer", None)  # the optimizer (parameter groups with their own learning rates) is ours
    ds.pop("scheduler", None)
    return ds


def _teacher_ratio(value: str) -> float | None:
    if value == "gap":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'gap', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m epic_ext.train`; --help shows every default."""
    defaults = TrainConfig()
    p = Parser(prog="python -m epic_ext.train", formatter_class=HelpFormatter,
                                description="EPIC training: TCD / LCD self-distillation of a LLaVA-1.5 / Qwen-VL model with "
                                            "DeepSpeed. Paths, the model's config and every setting are checked "
                                            "before DeepSpeed starts.")
    p.add_argument("--model", help="checkpoint directory: llava-hf LLaVA-1.5, Qwen2.5-VL, Qwen3-VL or "
                                   "LLaVA-OneVision (model + processor; the family comes from config.json's "
                                   "model_type)")
    p.add_argument("--data", help="LLaVA-format JSON or JSONL (id, image, conversations; Qwen2.5-VL and "
                                  "LLaVA-OneVision also video: a list of frame files)")
    p.add_argument("--image-folder", default=defaults.image_folder, help="folder the records' image paths start from")
    p.add_argument("--output-dir", default=defaults.output_dir,
                   help="metrics, TensorBoard logs, checkpoints/ and the exported final/")
    p.add_argument("--method", default=defaults.method, help=f"compressor: one of {available_methods()}")
    p.add_argument("--schedule", default=defaults.schedule, choices=SCHEDULES, help="compression schedule")
    p.add_argument("--ratio", type=float, default=defaults.ratio, help="target ratio (lcd, fixed)")
    p.add_argument("--layer", type=int, default=defaults.layer, help="compression layer K (tcd, fixed)")
    p.add_argument("--min-layer", type=int, default=defaults.min_layer, help="shallowest layer of lcd")
    p.add_argument("--teacher-ratio", type=_teacher_ratio, default=defaults.teacher_ratio,
                   help="teacher ratio of the fixed schedule: a number (0: all tokens), or 'gap' for the "
                        "target ratio minus the schedule's growing gap")
    p.add_argument("--schedule-constants", default=defaults.schedule_constants,
                   help="TCD constants: 'release' (default: the authors' code), 'paper' (the paper's text), or a "
                        'JSON object, e.g. \'{"preset": "paper", "gap_max": 0.2, "icd_stages": 4}\'')
    p.add_argument("--lam", type=float, default=None, help="KD weight lambda (0 = plain SFT; default: the preset's)")
    p.add_argument("--tau", type=float, default=None, help="distillation temperature (default: the preset's)")
    p.add_argument("--epochs", type=float, default=defaults.epochs, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps; > 0 overrides --epochs")
    p.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size, help="samples per process "
                   "and micro-batch")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (language model)")
    p.add_argument("--vision-lr", type=float, default=None, help="learning rate of the vision tower (None: --lr)")
    p.add_argument("--projector-lr", type=float, default=None, help="learning rate of the projector (None: --lr)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio, help="share of steps in warmup")
    p.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio,
                   help="learning rate at the end of the cosine, as a share of the peak")
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="gradient clipping (0: off)")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=defaults.freeze_vision,
                   help="freeze the vision tower")
    p.add_argument("--freeze-projector", action=argparse.BooleanOptionalAction, default=defaults.freeze_projector,
                   help="freeze the multimodal projector")
    p.add_argument("--freeze-llm", action=argparse.BooleanOptionalAction, default=defaults.freeze_llm,
                   help="freeze the language model")
    p.add_argument("--lora-r", type=int, default=None,
                   help="train LoRA adapters of this rank on the language model instead of its weights (peft); the "
                        "projector and vision tower follow --freeze-projector / --freeze-vision")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling alpha (default: 2 x --lora-r)")
    p.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout, help="dropout on the LoRA input")
    p.add_argument("--lora-target", default=None,
                   help="comma-separated linear layers of the language model's decoder layers that get adapters "
                        "(default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=defaults.merge_lora,
                   help="export the model with the adapters merged (OUTPUT_DIR/final, from_pretrained) and the "
                        "adapter in OUTPUT_DIR/final/adapter; without it OUTPUT_DIR/final is the adapter")
    p.add_argument("--zero", type=int, default=defaults.zero, help="bundled DeepSpeed ZeRO config: 0, 1, 2 or 3")
    p.add_argument("--deepspeed-config", help="your own DeepSpeed JSON ('auto' entries are filled in)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=defaults.bf16, help="bfloat16 training")
    add_attn_implementation_argument(p, ", in training and in the evaluation after it")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=defaults.gradient_checkpointing, help="recompute activations in the backward pass")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="longest tokenized sample")
    p.add_argument("--pad-to-square", action=argparse.BooleanOptionalAction, default=defaults.pad_to_square,
                   help="pad images to squares (LLaVA's 'pad' aspect ratio)")
    p.add_argument("--on-bad-image", choices=("skip", "error"), default=defaults.on_bad_image,
                   help="a missing or corrupt image, or placeholders that do not match the images: skip the "
                        "sample (counted) or stop")
    p.add_argument("--max-skip-fraction", type=float, default=defaults.max_skip_fraction,
                   help="stop when more than this share of the samples is skipped: checked on the records before "
                        "start-up (missing images, bad records, no answer) and on the samples seen at the end")
    p.add_argument("--padding-side", choices=("left", "right"), default=defaults.padding_side,
                   help="padding side of training batches")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=defaults.group_by_length,
                   help="batch text-only and image/video samples apart and samples of similar estimated length "
                        "together (LLaVA's group_by_modality_length; lengths: words + the family's visual tokens "
                        "per image): less padding; deterministic per seed and exact on resume")
    p.add_argument("--save-steps", type=int, default=defaults.save_steps, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints,
                   help="newest checkpoints kept (0: all)")
    p.add_argument("--resume", help="checkpoint directory, or 'auto' for the latest under OUTPUT_DIR/checkpoints; "
                                    "the settings must match the checkpoint's (logging, saving and output options "
                                    "may change)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=defaults.export,
                   help="save_pretrained the final model and processor to OUTPUT_DIR/final")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of data order, schedule draws and init")
    p.add_argument("--log-steps", type=int, default=defaults.log_steps, help="metrics every N steps")
    p.add_argument("--eval-data", help="LLaVA-format QA file evaluated after training (exact match)")
    p.add_argument("--eval-keep", type=int, nargs="*", default=[],
                   help="visual tokens kept in the evaluation (none given: all, 1/2, 1/4, 1/8)")
    p.add_argument("--dry-run", action="store_true", help="run every check, print the parameter counts and "
                   "DeepSpeed's estimate of the memory per GPU for --zero and --num-gpus / --num-nodes, then exit "
                   "(no weights are read)")
    p.add_argument("--num-gpus", type=int, default=defaults.num_gpus,
                   help="--dry-run: GPUs per node of the planned run (default: this run's processes)")
    p.add_argument("--num-nodes", type=int, default=defaults.num_nodes, help="--dry-run: nodes of the planned run")
    p.add_argument("--stop-after-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line, validated (UsageError naming the option otherwise)."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    values.pop("local_rank", None)  # the deepspeed launcher adds it; LOCAL_RANK in the environment is what we use
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
