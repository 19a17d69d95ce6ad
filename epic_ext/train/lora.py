"""LoRA training (`--lora-r`) through peft: the adapters, which modules they go on, and the export.

The adapters go on the language model's linear projections only (default: attention q/k/v/o and the MLP's
gate/up/down; the vision towers of some families use the same names, so the targets are a regular expression
anchored at the language model's decoder layers). `peft.get_peft_model` injects them into the loaded model in place:
the transformers model keeps its class, the pruning engine patches its language model as usual (the LoRA layers sit
inside attention and MLP, below the engine's decoder loop), and DeepSpeed trains the model itself. Teacher and student
passes share the base weights and the adapters.

The projector (unless --freeze-projector) and the vision tower (--no-freeze-vision) train in full as peft's
`modules_to_save`, so the adapter directory holds them too and `PeftModel.from_pretrained` restores the trained model.
LLaVA-OneVision's `image_newline` (a bare parameter, not a module) stays frozen under LoRA.
"""

from __future__ import annotations

import re

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qualified_name(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _language_model(model):
    return model.model.language_model


def language_model_linear_names(model) -> set[str]:
    """The last name component of every nn.Linear inside the language model's decoder layers (what --lora-target
    names)."""
    return {name.rsplit(".", 1)[-1] for name, module in _language_model(model).layers.named_modules()
            if isinstance(module, torch.nn.Linear)}


def targets_of(cfg) -> tuple[str, ...]:
    """--lora-target as a tuple of module names (the default when not given)."""
    if not cfg.lora_target:
        return DEFAULT_TARGETS
    return tuple(name.strip() for name in cfg.lora_target.split(",") if name.strip())


def check_targets(model, targets) -> None:
    """ValueError naming the targets that are no linear layer of the language model (and the ones that are)."""
    available = language_model_linear_names(model)
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ValueError(f"--lora-target: {', '.join(unknown)} is not a linear layer of this model's language model; "
                         f"its linear layers: {', '.join(sorted(available))}")


def meta_model(family, config):
    """The model of `config` on the meta device (no memory, no weights): its module names for the preflight."""
    import transformers  # noqa: PLC0415

    with torch.device("meta"):
        return getattr(transformers, family.model_class)._from_config(config)


def lora_config(model, cfg):
    """The peft LoraConfig of the run for `model` (the plain transformers model)."""
    from peft import LoraConfig  # noqa: PLC0415

    targets = targets_of(cfg)
    check_targets(model, targets)
    layers = _qualified_name(model, _language_model(model).layers)
    pattern = rf"{re.escape(layers)}\.\d+\.(?:.*\.)?(?:{'|'.join(re.escape(t) for t in targets)})"
    inner = model.model
    vision = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    save = []
    if not cfg.freeze_vision:
        save.append(_qualified_name(model, vision))  # Qwen-VL: the mergers inside it come along
    if not cfg.freeze_projector:
        for attr in ("multi_modal_projector",):
            if getattr(inner, attr, None) is not None:
                save.append(_qualified_name(model, getattr(inner, attr)))
        if cfg.freeze_vision:
            for attr in ("merger", "deepstack_merger_list"):
                module = getattr(vision, attr, None)
                if module is None:
                    continue
                # peft wraps modules, not lists: Qwen3-VL's deepstack mergers one by one
                parts = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
                save += [_qualified_name(model, part) for part in parts]
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r
    return LoraConfig(r=cfg.lora_r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=pattern,
                      modules_to_save=save or None, bias="none")


def apply_lora(model, cfg):
    """Injects the run's adapters into `model` in place (peft.get_peft_model); returns the PeftModel around it.

    Afterwards only the adapters and the modules_to_save copies require gradients; with --freeze-projector and a
    trained Qwen-VL vision tower, the mergers inside the tower's trainable copy are frozen again.
    """
    from peft import get_peft_model  # noqa: PLC0415

    peft_model = get_peft_model(model, lora_config(model, cfg))
    if cfg.freeze_projector and not cfg.freeze_vision:
        from ..models.families import parameter_parts  # noqa: PLC0415

        for p in parameter_parts(model)["projector"]:
            p.requires_grad_(False)
    return peft_model


def trained_model(family, cfg, state_dict: dict, dtype):
    """A fresh PeftModel on the CPU holding the run's trained weights: the base checkpoint loaded again, the same
    adapters injected, then every weight (base, adapters, trained copies) loaded from `state_dict` (the training
    model's keys; strict: a missing or unexpected key raises)."""
    model = family.load_model(cfg.model, dtype)
    peft_model = apply_lora(model, cfg)
    model.load_state_dict(state_dict, strict=True)
    return peft_model


def export(peft_model, processor, staging, merge: bool) -> None:
    """Writes the adapter (adapter_config.json + adapter_model.safetensors; PeftModel.from_pretrained(base, dir))
    into `staging`, or with `merge` the merged model (from_pretrained of the family's class) into `staging` and the
    adapter into `staging`/adapter; the processor beside the model / adapter in either case."""
    adapter_dir = staging / "adapter" if merge else staging
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    processor.save_pretrained(str(adapter_dir))
    if merge:
        merged = peft_model.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(str(staging), safe_serialization=True)
        processor.save_pretrained(str(staging))
