"""A training run at real widths on the CPU (`make real-width`): a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14 at 336 px:
576 visual tokens, the 1024 -> 4096 -> 4096 projector, a Vicuna-7B-wide language model with its 32064-entry
vocabulary) cut to 2 decoder layers, random weights from a config, trained for a few steps with TCD under ZeRO-3 with
gradient checkpointing through `python -m epic_ext.train` (LoRA adapters on the language model and the projector
trained; `--full` trains them fully, which needs more memory than the 24 GiB CPU machine has). It checks that nothing assumes toy sizes (the fused KL over
the 32064-entry vocabulary, 576-token images, 4096-wide hidden states) and reports peak memory and step time. Then
`--dry-run` prints DeepSpeed's estimate for the full 32-layer 7B model on 1 and 8 GPUs.

Usage: python bench/real_width.py [--work-dir build/real_width] [--steps 3] [--out bench/results/real_width.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 32064  # llava-1.5-7b-hf: 32000 + <image> + padding to 64
IMAGE = 336
PATCH = 14


def llava_7b_config(layers: int):
    import transformers as T

    vision = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=IMAGE, patch_size=PATCH, projection_dim=768)
    text = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=VOCAB, max_position_embeddings=4096)
    return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(IMAGE // PATCH) ** 2, projector_hidden_act="gelu")


def make_checkpoint(work: pathlib.Path) -> dict:
    """The 2-layer real-width checkpoint (random weights), its 32064-entry word-level tokenizer and CLIP processor,
    and the shapes task at 336 px. Reused when complete."""
    import torch
    import transformers as T

    from epic_ext.demo.task import SPECIAL_TOKENS, build_tiny_processor, demo_vocabulary, make_shapes_task

    model_dir, data_dir = work / "model", work / "data"
    marker = work / "assets-complete"
    if not marker.exists():
        words = list(demo_vocabulary())
        filler = VOCAB - len(SPECIAL_TOKENS) - 1 - len(set(w.lower() for w in words))
        words += [f"w{index:05d}" for index in range(filler)]
        processor = build_tiny_processor(words, image_size=IMAGE, patch_size=PATCH, save_dir=str(model_dir))
        assert len(processor.tokenizer) == VOCAB, len(processor.tokenizer)
        torch.manual_seed(0)
        config = llava_7b_config(2)
        config.pad_token_id = processor.tokenizer.pad_token_id
        started = time.perf_counter()
        model = T.LlavaForConditionalGeneration(config)
        model.save_pretrained(str(model_dir))
        print(f"built and saved the 2-layer real-width model ({sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M "
              f"parameters) in {time.perf_counter() - started:.0f} s", flush=True)
        del model
        make_shapes_task(data_dir, n_train=24, n_val=4, n_test=4, seed=0, image_size=IMAGE)
        marker.write_text("ok")
    return {"model": str(model_dir), "data": str(data_dir / "train.json"), "images": str(data_dir)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=str(ROOT / "build" / "real_width"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_width.json"))
    parser.add_argument("--full", action="store_true",
                        help="full fine-tuning of projector and language model instead of LoRA adapters (r 16) + "
                             "projector: needs more than the 24 GiB of the CPU machine (OOM-killed at 23.8 GiB RSS)")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    assets = make_checkpoint(work)
    run_dir = work / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    cmd = [sys.executable, "-m", "epic_ext.train", "--model", assets["model"], "--data", assets["data"],
           "--image-folder", assets["images"], "--output-dir", str(run_dir), "--schedule", "tcd", "--method", "fastv",
           "--layer", "1", "--min-layer", "1", "--zero", "3", "--gradient-checkpointing", "--micro-batch-size", "1",
           "--max-steps", str(args.steps), "--max-length", "1024", "--lr", "1e-5", "--no-export", "--seed", "0",
           *(() if args.full else ("--lora-r", "16"))]
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=str(work))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "step_time_s" in row]
    dry = {}
    for gpus in (1, 8):
        full = work / "llava-1.5-7b-config"
        llava_7b_config(32).save_pretrained(str(full))
        proc = subprocess.run([sys.executable, "-m", "epic_ext.train", "--model", str(full), "--data", assets["data"],
                               "--image-folder", assets["images"], "--zero", "3", "--num-gpus", str(gpus),
                               "--dry-run"], env=env, capture_output=True, text=True, check=True, cwd=str(work))
        dry[gpus] = proc.stdout.strip()
        print(proc.stdout)
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs), torch {__import__('torch').__version__}",
              "model": "LLaVA-1.5-7B widths, 2 decoder layers, random weights; vision tower frozen (default); "
                       + ("projector and language model fully trained" if args.full
                          else "LoRA r 16 on the language model's attention and MLP projections, projector trained"),
              "steps": len(steps), "wall_s": round(wall, 1),
              "step_time_s": [round(row["step_time_s"], 2) for row in steps],
              "peak_memory_mb": max(row["peak_memory_mb"] for row in steps),
              "losses": [round(row["loss"], 4) for row in steps],
              "tokens_per_s": [round(row["tokens_per_s"], 1) for row in steps],
              "dry_run_full_7b": dry}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "dry_run_full_7b"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
