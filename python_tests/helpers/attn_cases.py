"""The attention implementations the compressed-vs-reference model tests run under (`ATTN_CASES`), and how a case
runs a compressed model and compares its rows with the fp32 masked eager reference.

- eager (sdpa is the other model tests' default): a copy of the model switched with epic_ext.models.families.set_text_attn_implementation; the rows
  must equal the reference to 1e-5 (fp32, CPU).
- flash_standin: transformers' own flash_attention_2 path with pure-torch kernels (helpers.flash_standin), fp32 on
  the CPU: the same 1e-5.
- flash_attention_2 (CUDA with the flash-attn package only; skipped, visibly, elsewhere): a copy in fp16 on the GPU
  switched to flash_attention_2 by the same setter; the kept tokens must be the reference's, and the rows' largest
  error against the fp32 reference at most 2x that of the same model with SDPA in fp16 on the same GPU (plus 1e-3,
  for a baseline error near 0): the flash-attention tests' rule.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util

import pytest
import torch

from helpers.devices import HAS_CUDA
from helpers.flash_standin import flash_standin, use_flash

HAS_FLASH = HAS_CUDA and importlib.util.find_spec("flash_attn") is not None
ATTN_CASES = [  # sdpa, the default, is every other model test's
    "eager",
    "flash_standin",
    pytest.param("flash_attention_2", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAS_FLASH, reason="flash_attention_2 case: needs a CUDA device, epic_ext's CUDA kernels and flash-attn")]),
]
GPU_DTYPE = torch.float16


def _to(batch: dict, device, dtype) -> dict:
    return {k: (v.to(device=device, dtype=dtype) if k.startswith("pixel_values") and v.is_floating_point()
                else v.to(device)) if torch.is_tensor(v) else v for k, v in batch.items()}


def _variant(model, attn: str, device="cpu", dtype=torch.float32):
    from epic_ext.models.families import set_text_attn_implementation  # noqa: PLC0415

    variant = copy.deepcopy(model).to(device=device, dtype=dtype)
    if attn == "flash_standin":
        use_flash(variant)
    else:
        set_text_attn_implementation(variant, attn)
    return variant


class AttnCase:
    """Runs `call(model, batch)` (a compressed forward returning an output with logits and kept_positions) under
    one attention case and compares its kept rows with the reference's."""

    def __init__(self, attn: str, monkeypatch):
        self.attn = attn
        self.monkeypatch = monkeypatch
        self.baseline = None  # the SDPA fp16 output of the GPU case

    def run(self, model, batch: dict, call):
        if self.attn != "flash_attention_2":
            context = flash_standin(self.monkeypatch) if self.attn == "flash_standin" else contextlib.nullcontext()
            with context:
                return call(_variant(model, self.attn), batch)
        gpu_batch = _to(batch, "cuda", GPU_DTYPE)
        self.baseline = _cpu(call(_variant(model, "sdpa", "cuda", GPU_DTYPE), gpu_batch))
        return _cpu(call(_variant(model, "flash_attention_2", "cuda", GPU_DTYPE), gpu_batch))

    def assert_rows(self, out, mask: torch.Tensor, reference_logits: torch.Tensor) -> None:
        """The logits of out's kept real rows against reference_logits [B, L, V] at their original positions."""
        got, want = _rows(out, mask, reference_logits)
        if self.baseline is None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            return
        assert torch.equal(self.baseline.kept_positions, out.kept_positions), "SDPA and flash keep other tokens"
        sdpa_error = (_rows(self.baseline, mask, reference_logits)[0] - want).abs().max().item()
        flash_error = (got - want).abs().max().item()
        assert flash_error <= 2 * sdpa_error + 1e-3, (flash_error, sdpa_error)


def _cpu(out):
    out.logits = out.logits.float().cpu()
    out.kept_positions = out.kept_positions.cpu()
    return out


def _rows(out, mask, reference_logits):
    got, want = [], []
    for b in range(out.kept_positions.shape[0]):
        slots = out.kept_positions[b] >= 0
        positions = out.kept_positions[b][slots]
        real = mask[b, positions].bool()
        got.append(out.logits[b][slots][real])
        want.append(reference_logits[b, positions][real])
    return torch.cat(got), torch.cat(want)
