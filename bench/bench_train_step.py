"""One EPIC training step (TCD: student pass + no-grad teacher pass + fused KL) vs a plain compressed SFT step
(lambda = 0: student pass only), forward + backward + AdamW, on the demo model (or a 7B-shaped model on GPU is
left to a later run). Target on GPU: a TCD step at most 1.4x an SFT step."""

from __future__ import annotations

import pytest
import torch

from common import Recorder, Row, bench_device, device_name, synchronize
from epic_ext.distill import DistillConfig, distillation_loss
from epic_ext.models import apply_compression
from epic_ext.schedules import CompressionStep

DEVICE = bench_device()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from epic_ext.models.tiny import build_tiny_llava
    from epic_ext.data import LlavaDataset, collate, load_records
    from epic_ext.demo.task import build_tiny_processor, demo_vocabulary, make_shapes_task

    root = tmp_path_factory.mktemp("step")
    splits = make_shapes_task(root / "data", n_train=64, n_val=1, n_test=1, seed=0)
    processor = build_tiny_processor(demo_vocabulary())
    tok = processor.tokenizer
    model = build_tiny_llava(seed=0, vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                             pad_token_id=tok.pad_token_id, hidden=64, text_layers=4).to(DEVICE).train()
    dataset = LlavaDataset(load_records(splits["train"]), root / "data", processor, max_length=256)
    batch = collate([dataset[i] for i in range(16)], tok.pad_token_id)
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    handle = apply_compression(model, "fastv", layer=1, ratio=0.5)
    return model, handle, batch


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder("train_step", DEVICE)
    yield rec
    print(f"\n\ntraining step on {device_name(DEVICE)} (demo model, batch 16)")
    print(rec.table())
    times = {r.provider: r.ms for r in rec.rows}
    if "tcd" in times and "sft" in times:
        print(f"TCD step / SFT step: {times['tcd'] / times['sft']:.2f}x (target on GPU: <= 1.4x)")
    print(f"rows appended to {rec.write_csv({})}")


@pytest.mark.parametrize("provider", ["sft", "tcd"])
def test_step(benchmark, recorder, setup, provider):
    model, handle, batch = setup
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = CompressionStep(0.5, 0.5, 1, 0.2, 1)
    config = DistillConfig(lam=0.0 if provider == "sft" else 0.7, tau=1.0)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        out = distillation_loss(model, handle, batch, step, config, normalizer=100.0)
        out["loss"].backward()
        optimizer.step()
        synchronize(DEVICE)

    one_step()
    benchmark.pedantic(one_step, rounds=10, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    tokens = int(batch["attention_mask"].sum())
    recorder.add(Row("train_step", provider, "demo b16", "fp32", seconds * 1e3, tokens / seconds / 1e3,
                     "ktok/s", 0.0, 0.0))
