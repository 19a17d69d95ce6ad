"""Token ranking and pruning ops against the paths FastV implementations use today.

1. importance + select: epic_ext (attention_importance from the R query rows, then select_tokens) vs the eager
   path of the public FastV / EPIC code: layer K-1 runs eager attention with output_attentions, which builds the
   full [B, H, L, L] probability matrix, then the head mean of the chosen rows and torch.topk. Time and peak
   extra memory. FLOP rate is reported for epic_ext (2 passes of q.k: 4*B*Hq*R*L*D).
2. gather_tokens vs torch.gather with an expanded int64 index and vs index_select (per sample): time and % of
   the measured copy bandwidth (bytes = read kept rows + write them), for hidden states and for compacting a
   32-layer KV cache.

Targets (recorded, not asserted): importance+select with O(B*L) extra memory and >= 10x faster than the eager
path on GPU; gather at >= 85% of copy bandwidth on GPU.
"""

from __future__ import annotations

import pytest
import torch

from common import (PeakMemory, Recorder, Row, bench_device, device_name, measured_copy_bandwidth,
                    measured_matmul_flops, synchronize)
from epic_ext import ops

DEVICE = bench_device()
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BATCH, HEADS, HEAD_DIM = 16, 32, 128
LENGTH = 2048 if DEVICE == "cuda" else 700
SPAN, KEEP = 576, 128
ROUNDS = 20 if DEVICE == "cuda" else 7


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder("token_ops", DEVICE)
    yield rec
    copy = measured_copy_bandwidth(DEVICE)
    mm = measured_matmul_flops(DEVICE, DTYPE)
    print(f"\n\ntoken ops on {device_name(DEVICE)}; measured copy bandwidth {copy / 1e9:.1f} GB/s, "
          f"matmul {mm / 1e12:.2f} TFLOP/s ({str(DTYPE).split('.')[-1]})")
    print(rec.table())
    eager = {r.shape: r.ms for r in rec.rows if r.provider == "eager_attn_topk"}
    for r in rec.rows:
        if r.provider == "epic_ext" and r.shape in eager:
            print(f"importance+select speed-up over eager attention, {r.shape}: {eager[r.shape] / r.ms:.1f}x")
    print(f"rows appended to {rec.write_csv({'copy_GBps': copy / 1e9, 'matmul_TFLOPs': mm / 1e12})}")


def fastv_eager(query_all, key, rows):
    """What output_attentions gives FastV: the whole attention matrix of layer K-1, then its last rows."""
    batch, q_heads, length, head_dim = query_all.shape
    key = key.repeat_interleave(q_heads // key.shape[1], dim=1)
    logits = (query_all @ key.transpose(-1, -2)) * head_dim**-0.5
    causal = torch.ones(length, length, dtype=torch.bool, device=query_all.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)
    return probs[:, :, length - rows:, :].mean(dim=(1, 2))


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("provider", ["epic_ext", "eager_attn_topk"])
def test_importance_select(benchmark, recorder, provider, rows):
    g = torch.Generator().manual_seed(0)
    query_all = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, generator=g).to(DTYPE).to(DEVICE)
    key = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, generator=g).to(DTYPE).to(DEVICE)
    query = query_all[:, :, LENGTH - rows:, :].contiguous()
    positions = torch.arange(LENGTH - rows, LENGTH, device=DEVICE).expand(BATCH, rows).contiguous()
    span_start = torch.full((BATCH,), 35, dtype=torch.long, device=DEVICE)

    if provider == "epic_ext":
        def run():
            importance = ops.attention_importance(query, key, query_positions=positions)
            return ops.select_tokens(importance, span_start, SPAN, KEEP)
    else:
        def run():
            importance = fastv_eager(query_all, key, rows)
            top = importance[:, 35:35 + SPAN].topk(KEEP, dim=-1).indices + 35
            return top.sort(dim=-1).values

    run()
    synchronize(DEVICE)
    benchmark.pedantic(lambda: (run(), synchronize(DEVICE)), rounds=ROUNDS, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    with PeakMemory(DEVICE) as mem:
        run()
    flops = 4 * BATCH * HEADS * rows * LENGTH * HEAD_DIM if provider == "epic_ext" else \
        2 * BATCH * HEADS * LENGTH * LENGTH * HEAD_DIM
    rate = flops / seconds
    recorder.add(Row("importance_select", provider, f"B{BATCH} H{HEADS} L{LENGTH} R{rows}", str(DTYPE).split(".")[-1],
                     seconds * 1e3, rate / 1e9, "GF/s", 100 * rate / measured_matmul_flops(DEVICE, DTYPE),
                     mem.extra_bytes / 2**20))


GATHER_LENGTH = 2048 if DEVICE == "cuda" else 700
GATHER_CASES = {
    "hidden": dict(shape=(16, GATHER_LENGTH, 4096), dim=1, keep=GATHER_LENGTH - SPAN + KEEP),
    "kv32": dict(shape=(2 * 32 * 16 // (1 if DEVICE == "cuda" else 4), 32, GATHER_LENGTH, 128), dim=2,
                 keep=GATHER_LENGTH - SPAN + KEEP),
}


@pytest.mark.parametrize("case", list(GATHER_CASES))
@pytest.mark.parametrize("provider", ["epic_ext", "torch_gather", "index_select"])
def test_gather(benchmark, recorder, provider, case):
    spec = GATHER_CASES[case]
    shape, dim, keep = spec["shape"], spec["dim"], spec["keep"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(torch.bfloat16).to(DEVICE)
    index = torch.stack([torch.randperm(shape[dim], generator=g)[:keep].sort().values for _ in range(shape[0])])
    index = index.to(DEVICE)
    if provider == "epic_ext":
        run = lambda: ops.gather_tokens(x, index, dim=dim)  # noqa: E731
    elif provider == "torch_gather":
        view = [shape[0]] + [1] * (len(shape) - 1)
        view[dim] = keep
        out_shape = list(shape)
        out_shape[dim] = keep
        run = lambda: torch.gather(x, dim, index.view(view).expand(out_shape))  # noqa: E731
    else:
        run = lambda: torch.stack([x[b].index_select(dim - 1, index[b]) for b in range(shape[0])])  # noqa: E731
    expected = ops.gather_tokens(x, index, dim=dim)
    assert torch.equal(run(), expected)
    benchmark.pedantic(lambda: (run(), synchronize(DEVICE)), rounds=ROUNDS, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    with PeakMemory(DEVICE) as mem:
        run()
    moved = 2 * expected.numel() * expected.element_size()
    rate = moved / seconds
    note = "x".join(map(str, shape)) + f" keep {keep}"
    label = "KV cache (32 layers as batch)" if case == "kv32" else "hidden"
    recorder.add(Row("gather_tokens", provider, f"{case} {note}"[:20], "bfloat16", seconds * 1e3, rate / 1e9, "GB/s",
                     100 * rate / measured_copy_bandwidth(DEVICE), mem.extra_bytes / 2**20, {"case": label}))
