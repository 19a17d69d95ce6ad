"""A tiny llava-hf checkpoint (2-layer LM, 16 visual tokens, word-level tokenizer) and a small shapes QA task on
disk, for the tests that run `python -m epic_ext.train` and `python -m epic_ext.eval`."""

from __future__ import annotations

import pathlib


def make_train_assets(root: pathlib.Path) -> dict:
    """Writes root/model (model + processor) and root/data (train/val/test JSON + images); returns the paths."""
    from epic_ext.models.tiny import build_tiny_llava
    from epic_ext.demo.task import build_tiny_processor, demo_vocabulary, make_shapes_task

    splits = make_shapes_task(root / "data", n_train=96, n_val=8, n_test=16, seed=1)
    processor = build_tiny_processor(demo_vocabulary(), save_dir=root / "model")
    tokenizer = processor.tokenizer
    model = build_tiny_llava(seed=0, vocab_size=len(tokenizer),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             pad_token_id=tokenizer.pad_token_id, hidden=32, text_layers=2, heads=2, kv_heads=1)
    model.save_pretrained(str(root / "model"))
    return {"root": root, "model": str(root / "model"), "data": splits["train"], "test": splits["test"],
            "images": str(root / "data")}
