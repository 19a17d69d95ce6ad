"""The EPIC loss of a model with LoRA adapters (peft, as `python -m epic_ext.train --lora-r` injects them) equals the
loss of a plain model whose weights are the merged ones, W + (alpha / r) B A, computed here by hand (not by peft's
merge), in float32 at a tight tolerance (the engine's kernels take no float64), with random non-zero adapters; and its gradients reach only the adapters (and the trained
projector copy)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from epic_ext.distill import DistillConfig, distillation_loss  # noqa: E402
from epic_ext.models import apply_compression  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava, build_tiny_qwen2_5_vl, build_tiny_qwen3_vl  # noqa: E402
from epic_ext.schedules import CompressionStep  # noqa: E402
from epic_ext.train import lora  # noqa: E402
from helpers.llava_data import make_llava_batch  # noqa: E402
from helpers.qwen_data import make_qwen_batch  # noqa: E402

LAYOUTS = [[3, "img", 6, 5], [5, "img", 2, 7], [2, "img", 9, 3]]
QWEN_LAYOUTS = [[3, ("img", 4, 4), 6, 5], [5, ("img", 4, 6), 2, 7], [2, ("img", 2, 4), 9, 3]]


def _cfg(**changes):
    values = dict(lora_r=4, lora_alpha=6.0, lora_dropout=0.0, lora_target=None, freeze_vision=True,
                  freeze_projector=False)
    values.update(changes)
    return types.SimpleNamespace(**values)


def _batch(family, model):
    if family == "llava":
        batch = make_llava_batch(model, LAYOUTS, padding="right", seed=1)
    else:
        batch = make_qwen_batch(model, QWEN_LAYOUTS, padding="right", seed=1)
    labels = batch["input_ids"].clone()
    labels[:, :-5] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def _merged_by_hand(model) -> torch.nn.Module:
    """A plain copy of the adapter model: every LoRA linear replaced by nn.Linear(W + scaling * B @ A), every
    modules_to_save wrapper by its trained copy."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    from peft.utils.other import ModulesToSaveWrapper  # noqa: PLC0415

    model = copy.deepcopy(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(done + ".") for done in replaced):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, LoraLayer):
            base = module.base_layer
            merged = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                     dtype=base.weight.dtype)
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            with torch.no_grad():
                merged.weight.copy_(base.weight + delta)
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
            setattr(parent, attr, merged)
            replaced.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            setattr(parent, attr, module.modules_to_save["default"])
            replaced.append(name)
    return model


BUILDERS = {"llava": build_tiny_llava, "qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl}


@pytest.mark.parametrize("family, freeze_vision", [(family, True) for family in sorted(BUILDERS)]
                         + [("llava", False), ("qwen3_vl", False)])
def test_lora_loss_equals_merged_weights(family, freeze_vision):
    """freeze_vision False: the vision tower is a trained copy too (Qwen-VL: with its mergers inside)."""
    build = BUILDERS[family]
    model = build(seed=2).train()
    cfg = _cfg(freeze_vision=freeze_vision)
    lora.apply_lora(model, cfg)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero in peft: random adapters (and a changed projector copy) instead
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    reference = _merged_by_hand(model)
    assert not any("lora_" in name for name, _ in reference.named_parameters())
    batch = _batch(family, model)
    step = CompressionStep(0.5, 0.6, 1, 0.2, 1)
    outs = []
    for m in (model, reference):
        handle = apply_compression(m, "fastv", layer=1, ratio=0.5)
        outs.append(distillation_loss(m, handle, batch, step, DistillConfig(0.6, 2.0), normalizer=10))
    ours, expected = outs
    assert float(ours["tokens"]) == float(expected["tokens"]) > 0
    assert float(ours["kd_sum"]) > 0  # the teacher's pass differs: the distillation term is exercised
    torch.testing.assert_close(ours["loss"], expected["loss"], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours["sft_sum"], expected["sft_sum"], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours["kd_sum"], expected["kd_sum"], rtol=2e-5, atol=1e-6)

    ours["loss"].backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    unused = {n for n in trainable - with_grad if "post_layernorm" in n}  # LLaVA reads the tower's layer -2
    assert with_grad == trainable - unused
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)
    assert all("lora_" in n or "modules_to_save" in n for n in with_grad), sorted(with_grad)
    assert any("modules_to_save" in n for n in with_grad)  # the projector's trained copy
    vision = "visual" if family.startswith("qwen") else "vision_tower"
    assert any(f"{vision}.modules_to_save" in n and "merger" not in n for n in with_grad) == (not freeze_vision)


def test_default_targets_stay_in_the_language_model():
    """Qwen2.5-VL's vision blocks have gate/up/down projections too: the adapters go on the language model's only."""
    model = build_tiny_qwen2_5_vl(seed=0)
    lora.apply_lora(model, _cfg(freeze_projector=True))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    layers = model.config.text_config.num_hidden_layers
    assert len(adapted) == 7 * layers
    assert all(name.startswith("model.language_model.layers.") for name in adapted), sorted(adapted)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
