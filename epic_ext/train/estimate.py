"""`python -m epic_ext.train --dry-run`: after every preflight check, the model's parameter counts (built on the meta
device from its config.json: no weights are read) and DeepSpeed's estimate of the memory the model states of a run
need per GPU (parameters, gradients, optimizer states: not activations), for the chosen ZeRO stage and number of
GPUs, and then nothing starts."""

from __future__ import annotations

import contextlib
import io

from .run import Run

GIB = 2**30


def parameter_counts(run: Run) -> dict[str, int]:
    """{"vision", "projector", "llm": parameters of each part, "trainable": of the parts not frozen, "total",
    "largest_layer": the most parameters any one module holds itself (ZeRO-3 gathers one at a time)}."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from ..models.families import parameter_parts  # noqa: PLC0415

    config = transformers.AutoConfig.from_pretrained(run.cfg.model)
    with torch.device("meta"):
        model = getattr(transformers, run.family.model_class)._from_config(config)
    parts = {name: sum(p.numel() for p in params) for name, params in parameter_parts(model).items()}
    frozen = {"vision": run.cfg.freeze_vision, "projector": run.cfg.freeze_projector, "llm": run.cfg.freeze_llm}
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return {**parts, "trainable": sum(n for name, n in parts.items() if not frozen[name]),
            "total": sum(parts.values()), "largest_layer": largest}


def deepspeed_estimate(counts: dict[str, int], zero_stage: int, gpus_per_node: int, nodes: int) -> dict:
    """DeepSpeed's own estimators (deepspeed.runtime.zero.stage_1_and_2 / stage3 estimate_*_model_states_mem_needs,
    without offload, as the bundled configs run) for the model's parameters: {"gpu_bytes", "cpu_bytes",
    "table": DeepSpeed's printed table of every offload choice}. ZeRO 0 and 1 have no estimator of their own: 0 is
    the stage-2 estimate on one GPU (nothing partitioned), 1 the stage-2 one (it partitions the optimizer states
    like 2, and keeps full gradients: slightly more)."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2  # noqa: PLC0415

    total = counts["total"]
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        if zero_stage == 3:
            cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
                total, counts["largest_layer"], gpus_per_node, nodes, cpu_offload=False)
            stage3.estimate_zero3_model_states_mem_needs_all_cold(total, counts["largest_layer"], gpus_per_node,
                                                                  nodes)
        else:
            per_node = 1 if zero_stage == 0 else gpus_per_node
            cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(
                total, per_node, 1 if zero_stage == 0 else nodes, cpu_offload=False)
            stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold(total, per_node, 1 if zero_stage == 0
                                                                         else nodes)
    return {"gpu_bytes": gpu, "cpu_bytes": cpu, "table": table.getvalue().strip()}


def report(run: Run, gpus_per_node: int, nodes: int) -> str:
    counts = parameter_counts(run)
    estimate = deepspeed_estimate(counts, run.zero_stage, gpus_per_node, nodes)
    millions = {key: f"{value / 1e6:,.1f}M" for key, value in counts.items()}
    lines = [f"dry run: {run.family.title} from {run.cfg.model} ({run.num_layers} decoder layers), ZeRO "
             f"{run.zero_stage}, {gpus_per_node} GPU(s) x {nodes} node(s)",
             f"parameters: total {millions['total']} (vision {millions['vision']}, projector {millions['projector']}, "
             f"language model {millions['llm']}); trainable with the --freeze-* options {millions['trainable']}; "
             f"largest layer {millions['largest_layer']}",
             f"DeepSpeed's estimate of the model states per GPU, every parameter trained, no offload: "
             f"{estimate['gpu_bytes'] / GIB:.1f} GiB per GPU, {estimate['cpu_bytes'] / GIB:.1f} GiB CPU per node "
             "(activations come on top; --gradient-checkpointing shrinks them)",
             "DeepSpeed's table (estimate_zero*_model_states_mem_needs_all_cold):", estimate["table"]]
    return "\n".join(lines)
