"""EPIC loss against a straightforward reference: full logits from two forwards, manual shift and mask, F.kl_div."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from epic_ext.distill import DistillConfig, distillation_loss, shifted_targets  # noqa: E402
from epic_ext.models import apply_compression  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava  # noqa: E402
from epic_ext.schedules import CompressionStep  # noqa: E402
from helpers.llava_data import make_llava_batch  # noqa: E402

LAYOUTS = [[3, "img", 6, 5], [5, "img", 2, 7], [2, "img", 9, 3]]


def make_batch(model, padding="right", seed=0):
    batch = make_llava_batch(model, LAYOUTS, padding=padding, seed=seed)
    labels = batch["input_ids"].clone()
    labels[:, :-5] = -100  # the last 5 positions are the "answer"
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def reference_loss(model, handle, batch, step, lam, tau):
    """Two plain forwards with full logits, then per-sample matching of kept positions."""
    targets = shifted_targets(batch["labels"])
    targets[batch["input_ids"] == model.config.image_token_id] = -100
    from epic_ext.models import prompt_query_positions  # noqa: PLC0415

    query = prompt_query_positions(batch["attention_mask"], batch["labels"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    outs = []
    for ratio, layer in ((step.student_ratio, step.student_layer), (step.teacher_ratio, step.teacher_layer)):
        with handle.override(ratio=ratio, layer=layer, query_positions=query):
            out = model(**inputs)
        kept = out.get("kept_positions")
        if kept is None:
            kept = torch.arange(out.logits.shape[1]).expand(out.logits.shape[0], -1)
        outs.append((out.logits, kept))
    (s_logits, s_kept), (t_logits, t_kept) = outs
    sft, kd, count = 0.0, 0.0, 0
    for b in range(targets.shape[0]):
        for slot, position in enumerate(s_kept[b].tolist()):
            if position < 0 or targets[b, position] == -100:
                continue
            t_slot = t_kept[b].tolist().index(position)
            sft = sft + torch.nn.functional.cross_entropy(s_logits[b, slot][None], targets[b, position][None],
                                                          reduction="sum")
            log_q = torch.log_softmax(s_logits[b, slot] / tau, -1)
            log_p = torch.log_softmax(t_logits[b, t_slot].detach() / tau, -1)
            kd = kd + torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") * tau**2
            count += 1
    return ((1 - lam) * sft + lam * kd) / count, count


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("lam, tau", [(0.7, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 4.0)])
def test_loss_and_gradient_match_reference(padding, lam, tau):
    model = build_tiny_llava(seed=2).train()
    batch = make_batch(model, padding, seed=int(lam * 10 + tau))
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    step = CompressionStep(0.5, 0.75, 2, 0.25, 1)
    try:
        model.zero_grad()
        ours = distillation_loss(model, handle, batch, step, DistillConfig(lam, tau), normalizer=15)
        ours["loss"].backward()
        grad_ours = model.lm_head.weight.grad.clone()
        model.zero_grad()
        expected, count = reference_loss(model, handle, batch, step, lam, tau)
        expected.backward()
        grad_ref = model.lm_head.weight.grad.clone()
    finally:
        handle.remove()
    assert count == 15 == int(ours["tokens"])
    # fp32 noise of a KL between near-identical rows, scaled by tau^2
    torch.testing.assert_close(ours["loss"], expected, rtol=1e-5, atol=2e-7 * tau**2)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
    if lam == 0.0:
        assert float(ours["kd_sum"]) == 0.0


def test_lambda_zero_is_plain_sft_with_one_pass():
    model = build_tiny_llava(seed=3).train()
    batch = make_batch(model)
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    calls = []
    hook = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = distillation_loss(model, handle, batch, CompressionStep(0, 0.5, 2, 0.0, 2), DistillConfig(0.0), 15)
    finally:
        hook.remove()
        handle.remove()
    assert len(calls) == 1
    assert float(out["loss"]) == pytest.approx(float(out["sft_sum"]) / 15)


def test_all_ignored_batch_gives_finite_zero_loss():
    model = build_tiny_llava(seed=4).train()
    batch = make_batch(model)
    batch["labels"][:] = -100
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    try:
        out = distillation_loss(model, handle, batch, CompressionStep(0, 0.5, 2, 0.2, 2), DistillConfig(0.7), 0)
        out["loss"].backward()
    finally:
        handle.remove()
    assert torch.isfinite(out["loss"]) and float(out["loss"]) == 0.0


def test_uncompressed_layer_means_no_pruning():
    model = build_tiny_llava(seed=5).train()
    batch = make_batch(model)
    handle = apply_compression(model, "fastv", layer=2, ratio=0.5)
    try:
        full = distillation_loss(model, handle, batch, CompressionStep(0, 0.9, 4, 0.9, 4), DistillConfig(0.7), 15)
        none = distillation_loss(model, handle, batch, CompressionStep(0, 0.0, 2, 0.0, 2), DistillConfig(0.7), 15)
    finally:
        handle.remove()
    torch.testing.assert_close(full["loss"], none["loss"])
    assert float(full["kd_sum"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs", [dict(lam=1.5), dict(lam=-0.1), dict(tau=0.0)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        DistillConfig(**kwargs)
