"""temperature_kl forward+backward: epic_ext vs the torch reference (eager, torch.compile) and Liger-Kernel.

Effective bandwidth counts the bytes the fused op must move at least: read teacher + read student + write the
student gradient. Peak extra memory is what the call allocates beyond its inputs (CUDA allocator peak, or the
process's peak RSS on CPU).

Targets (recorded, not asserted): CPU fwd+bwd >= 3x the torch eager reference (fp32, 4096 x 32000); GPU >= 85%
of the measured copy bandwidth for bf16 and faster than every alternative.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from common import PeakMemory, Recorder, Row, bench_device, device_name, measured_copy_bandwidth, synchronize
from epic_ext import ops, reference

DEVICE = bench_device()
TEMPERATURE = 2.0

if DEVICE == "cuda":
    CASES = [(4096, 32000, torch.bfloat16), (16384, 32000, torch.bfloat16), (4096, 152064, torch.bfloat16),
             (4096, 32000, torch.float32)]
    ROUNDS = 10
else:  # 2-core CPU: the target shape plus two smaller ones
    CASES = [(4096, 32000, torch.float32), (1024, 32000, torch.bfloat16), (256, 152064, torch.float32)]
    ROUNDS = 3

PROVIDERS = ["epic_ext", "torch_eager", "torch_compile"]
if DEVICE == "cuda":
    PROVIDERS.append("liger")


def reference_loss(student, teacher):
    return reference.temperature_kl(student, teacher, temperature=TEMPERATURE, compute_dtype=torch.float32)


_compiled_reference = None


def make_loss_fn(provider: str):
    global _compiled_reference
    if provider == "epic_ext":
        return lambda s, t: ops.temperature_kl(s, t, temperature=TEMPERATURE)
    if provider == "torch_eager":
        return reference_loss
    if provider == "torch_compile":
        if _compiled_reference is None:
            _compiled_reference = torch.compile(reference_loss, dynamic=False)
        return _compiled_reference
    if provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            pytest.skip("liger-kernel not installed")
        from liger_kernel.transformers import LigerKLDIVLoss  # noqa: PLC0415

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger_loss(s, t):  # temperature and log-softmax in torch, KL in Liger's Triton kernel
            log_q = torch.log_softmax(s.float() / TEMPERATURE, dim=-1)
            log_p = torch.log_softmax(t.float() / TEMPERATURE, dim=-1)
            return kl(log_q, log_p) * TEMPERATURE**2

        return liger_loss
    raise ValueError(provider)


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder("temperature_kl", DEVICE)
    yield rec
    peak = measured_copy_bandwidth(DEVICE)
    print(f"\n\ntemperature_kl fwd+bwd on {device_name(DEVICE)}; measured copy bandwidth {peak / 1e9:.1f} GB/s")
    print(rec.table())
    eager = {r.shape + r.dtype: r.ms for r in rec.rows if r.provider == "torch_eager"}
    for r in rec.rows:
        if r.provider == "epic_ext" and (r.shape + r.dtype) in eager:
            print(f"speed-up over torch eager, {r.shape} {r.dtype}: {eager[r.shape + r.dtype] / r.ms:.2f}x")
    print(f"rows appended to {rec.write_csv({'copy_GBps': peak / 1e9})}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{str(c[2]).split('.')[-1]}")
def test_temperature_kl_fwd_bwd(benchmark, recorder, provider, case):
    n_rows, vocab, dtype = case
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(n_rows, vocab, generator=g) * 3).to(dtype).to(DEVICE).requires_grad_(True)
    teacher = (torch.randn(n_rows, vocab, generator=g) * 3).to(dtype).to(DEVICE)
    loss_fn = make_loss_fn(provider)

    def fwd_bwd():
        student.grad = None
        loss_fn(student, teacher).backward()
        synchronize(DEVICE)

    fwd_bwd()  # warm-up (and compilation)
    benchmark.pedantic(fwd_bwd, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    student.grad = None
    with PeakMemory(DEVICE) as mem:
        fwd_bwd()
    elem = student.element_size()
    moved = n_rows * vocab * (2 * elem + teacher.element_size())
    bandwidth = moved / seconds
    recorder.add(Row("temperature_kl", provider, f"{n_rows}x{vocab}", str(dtype).split(".")[-1], seconds * 1e3,
                     bandwidth / 1e9, "GB/s", 100 * bandwidth / measured_copy_bandwidth(DEVICE),
                     mem.extra_bytes / 2**20))
