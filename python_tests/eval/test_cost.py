"""epic_ext.cost (FLOPs and KV-cache formulas, the families' built-in shapes), their agreement with the DynamicCache
a pruned model builds, the paper's efficiency numbers, and the `python -m epic_ext.efficiency` CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from epic_ext import efficiency  # noqa: E402
from epic_ext.cost import (  # noqa: E402
    kept_from_ratio, kv_cache_bytes, model_shape, prefill_flops, report, tokens_per_layer)
from epic_ext.efficiency import cache_bytes  # noqa: E402
from epic_ext.models.families import LMShape, builtin_shapes  # noqa: E402
from epic_ext.models import apply_compression  # noqa: E402
from epic_ext.models.tiny import build_tiny_llava  # noqa: E402
from helpers.llava_data import make_llava_batch  # noqa: E402

# 2 layers, d=8, m=16, 2 query heads sharing 1 kv head of dim 4, vocab 10, 6 visual tokens
SMALL = LMShape("small", layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10,
                visual_tokens=6)


def test_formulas_match_hand_computed_numbers():
    # n = 10 tokens (6 visual), K = 1, 2 visual kept: layer 0 sees 10, layer 1 sees 6
    assert tokens_per_layer(SMALL, 10, 6, 1, 2) == [10, 6]
    # FastV 4nd^2 + 2n^2d + 2ndm: n=5 -> 1280 + 400 + 1280; n=3 -> 768 + 144 + 768
    assert prefill_flops(SMALL, [5, 3], "fastv") == 2960 + 1680
    # exact, n=5: q,o 2*640; k,v 2*(2*5*8*4)=640; scores + weighted sum 2*(2*25*2*4)=800; SwiGLU 3*(2*5*8*16)=3840
    #        n=3: q,o 2*384; k,v 2*192; attention 2*144; SwiGLU 3*768
    assert prefill_flops(SMALL, [5, 3], "exact") == (1280 + 640 + 800 + 3840) + (768 + 384 + 288 + 2304)
    assert prefill_flops(SMALL, [5, 3], "exact", logits_positions=1) == 10304 + 2 * 8 * 10  # + lm_head
    # KV: 2 (K, V) * batch 3 * 1 kv head * dim 4 * 2 bytes * (10 + 6)
    assert kv_cache_bytes(SMALL, 10, 6, layer=1, kept_visual=2, dtype_bytes=2, batch=3) == 2 * 3 * 4 * 2 * 16
    # layer == layers: no layer is pruned
    assert kv_cache_bytes(SMALL, 10, 6, 2, 2, 2) == kv_cache_bytes(SMALL, 10, 6, 1, 6, 2)


def test_paper_efficiency_numbers_llava_7b():
    """EPIC reports, for LLaVA-1.5-7B at 64 of 576 visual tokens with K=2: FLOPs -83.9%, KV cache -88.9%.

    FastV's formula gives -83.6% FLOPs when only the 576 image tokens are counted (no text), 0.3 points from
    the paper, and -75.5% with a 64-token text prompt (the text tokens are never dropped, so they dilute the
    saving). The paper's -88.9% KV is exactly 1 - 64/576: the visual tokens alone, as if every layer were pruned
    (K=0) and there were no text. Layers 0 and 1 keep all 576 tokens, so the true cache saving at K=2 is -83.3%
    with no text and -75.0% with 64 text tokens. We assert these values, not tuned constants.
    """
    shape = builtin_shapes()["llava-1.5-7b"]
    for text_tokens in (0, 64):
        row = report("llava-1.5-7b", keeps=[64], layer=2, text_tokens=text_tokens)[0]
        print(f"text={text_tokens}: FLOPs -{row['fastv_reduction_pct']:.2f}% (FastV formula), "
              f"-{row['exact_reduction_pct']:.2f}% (exact); KV -{row['kv_reduction_pct']:.2f}%")
    no_text = report("llava-1.5-7b", keeps=[64], layer=2, text_tokens=0)[0]
    prompt = report("llava-1.5-7b", keeps=[64], layer=2, text_tokens=64)[0]
    assert abs(no_text["fastv_reduction_pct"] - 83.9) < 0.5
    assert 70.0 < prompt["fastv_reduction_pct"] < 80.0
    assert no_text["kv_reduction_pct"] == pytest.approx(100 * (1 - (2 * 576 + 30 * 64) / (32 * 576)))  # 83.33
    assert 70.0 < prompt["kv_reduction_pct"] < 80.0
    visual_only = 1 - kv_cache_bytes(shape, 576, 576, 0, 64, 2) / kv_cache_bytes(shape, 576, 576, 0, 576, 2)
    assert 100 * visual_only == pytest.approx(88.9, abs=0.05)
    # the exact count moves with the FastV one (within a point) although it is ~2.5x larger in absolute terms
    assert abs(prompt["exact_reduction_pct"] - prompt["fastv_reduction_pct"]) < 1.0


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


@pytest.mark.parametrize("ratio", [None, 0.0, 0.5, 0.75])
@pytest.mark.parametrize("layer", [1, 2])
def test_kv_bytes_equal_the_dynamic_cache_of_a_pruned_model(tiny, ratio, layer):
    batch = make_llava_batch(tiny, [[5, "img", 7], [5, "img", 7]], seed=layer)  # equal lengths: no padding slots
    n_tokens, n_visual = batch["input_ids"].shape[1], tiny.config.image_seq_length
    handle = apply_compression(tiny, "fastv", layer=layer, ratio=ratio) if ratio is not None else None
    try:
        with torch.no_grad():
            cache = tiny(**batch, use_cache=True).past_key_values
    finally:
        if handle is not None:
            handle.remove()
    kept = kept_from_ratio(n_visual, ratio or 0.0)
    lengths = [layer_cache.keys.shape[2] for layer_cache in cache.layers]
    shape = model_shape(tiny)
    assert lengths == tokens_per_layer(shape, n_tokens, n_visual, layer, kept)
    assert cache_bytes(cache) == kv_cache_bytes(shape, n_tokens, n_visual, layer, kept, dtype_bytes=4, batch=2)


def test_model_shape_sources(tmp_path, tiny):
    config = efficiency.llava_config("llava-1.5-7b")
    for source in (config, str(tmp_path), str(tmp_path / "config.json")):
        if source == str(tmp_path):
            config.save_pretrained(tmp_path)
        assert dataclasses.replace(model_shape(source), name="llava-1.5-7b") == builtin_shapes()["llava-1.5-7b"]
    shape = model_shape(tiny)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.visual_tokens) == (4, 4, 2, 16, 16)


def test_bad_input_names_the_argument(capsys):
    with pytest.raises(ValueError, match=r"model.*llava-1\.5-7b, llava-1\.5-13b"):
        model_shape("llava-2-7b")
    with pytest.raises(ValueError, match=r"keep must be in \[0, 576\]"):
        report(keeps=[577])
    with pytest.raises(ValueError, match=r"layer must be in \[0, 31\]"):
        report(layer=32)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 31\]"):
        report(layer=-1)
    with pytest.raises(ValueError, match="layer must be in"):
        kv_cache_bytes(SMALL, 10, 6, layer=3, kept_visual=2, dtype_bytes=2)
    with pytest.raises(ValueError, match="kept_visual"):
        kv_cache_bytes(SMALL, 10, 6, layer=1, kept_visual=7, dtype_bytes=2)
    with pytest.raises(ValueError, match="n_tokens_per_layer"):
        prefill_flops(SMALL, [5])
    with pytest.raises(ValueError, match="formula"):
        prefill_flops(SMALL, [5, 3], "flops")
    for argv, option in ((["--keep", "600"], "--keep"), (["--layer", "40"], "--layer"),
                         (["--model", "nope"], "--model")):
        with pytest.raises(SystemExit) as info:
            efficiency.main(argv)
        assert info.value.code == 2
        assert option in capsys.readouterr().err


def test_cli_prints_the_table(capsys):
    assert efficiency.main(["--model", "llava-1.5-7b", "--layer", "2"]) == 0
    out = capsys.readouterr().out
    print(out)
    lines = out.splitlines()
    assert "FastV TFLOPs" in lines[1] and "KV MB" in lines[1]
    assert [line.split()[0] for line in lines[3:]] == ["576", "192", "128", "64"]


def test_cli_runs_as_module(tmp_path):
    # cwd outside the source tree: `-m` would otherwise import the sources instead of an installed package
    result = subprocess.run([sys.executable, "-m", "epic_ext.efficiency", "--model", "llava-1.5-13b", "--keep",
                             "128"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "llava-1.5-13b: 40 layers" in result.stdout and result.stdout.splitlines()[-1].split()[0] == "128"


def test_cli_measure_tiny_on_cpu(capsys):
    assert efficiency.main(["--measure", "--tiny", "--device", "cpu", "--dtype", "fp32", "--decode-tokens", "2",
                            "--repeats", "1", "--keep", "576", "64"]) == 0
    out = capsys.readouterr().out
    assert "prefill ms" in out and "decode ms/tok" in out and "differ" not in out


def test_measure_refuses_a_model_that_does_not_fit(monkeypatch):
    monkeypatch.setattr(efficiency, "available_memory", lambda device: 8 * 2**30)
    with pytest.raises(MemoryError, match=r"7\.06B parameters.*--layers N or --tiny"):
        efficiency.build_random_llava(efficiency.llava_config("llava-1.5-7b"), "bf16", "cpu")


# ---- the other families (issue 14): shapes written in code, visual-token counts per sample ----
@pytest.mark.parametrize("name, dims", [
    # layers, hidden, intermediate, heads, kv heads, head dim, vocab, typical visual tokens
    ("llava-next-vicuna-7b", (32, 4096, 11008, 32, 32, 128, 32064, 2928)),
    ("llava-next-mistral-7b", (32, 4096, 14336, 32, 8, 128, 32064, 2928)),
    ("llava-onevision-7b", (28, 3584, 18944, 28, 4, 128, 152128, 3699)),
    ("qwen2.5-vl-7b", (28, 3584, 18944, 28, 4, 128, 152064, 1296)),
    ("qwen3-vl-8b", (36, 4096, 12288, 32, 8, 128, 151936, 1024)),
])
def test_builtin_shapes_of_the_other_families(name, dims):
    shape = builtin_shapes()[name]
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab,
            shape.visual_tokens) == dims
    assert shape.heads * shape.head_dim == shape.hidden
    row = report(name, keeps=[shape.visual_tokens // 4], layer=2, text_tokens=64)[0]
    n = shape.visual_tokens + 64
    after = 64 + shape.visual_tokens // 4
    assert row["tokens_after"] == after
    # 2 (K, V) * kv_heads * head_dim * 2 bytes (bf16) * (2 full layers + the rest pruned)
    assert row["kv_bytes"] == 2 * shape.kv_heads * 128 * 2 * (2 * n + (shape.layers - 2) * after)


def test_visual_tokens_per_sample_for_anyres_and_video():
    # a 32-frame LLaVA-OneVision video: 32 * 196 + 1 tokens
    rows = report("llava-onevision-7b", keeps=[6273, 784], layer=2, text_tokens=0, visual_tokens=6273)
    assert [r["keep"] for r in rows] == [6273, 784] and rows[0]["tokens"] == 6273
    with pytest.raises(ValueError, match=r"keep must be in \[0, 1296\]"):
        report("qwen2.5-vl-7b", keeps=[1297])
    with pytest.raises(ValueError, match="visual_tokens must be an int >= 1"):
        report("qwen2.5-vl-7b", visual_tokens=0)
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

    with pytest.raises(ValueError, match="no fixed visual-token count"):
        report(Qwen2_5_VLConfig())  # dynamic resolution: the config alone gives no count
    assert report(Qwen2_5_VLConfig(), keeps=[10], visual_tokens=40)[0]["tokens"] == 104


def test_shapes_of_the_tiny_families():
    from epic_ext.models.tiny import build_tiny_llava_next, build_tiny_llava_onevision  # noqa: PLC0415

    for model, family in ((build_tiny_llava_next(), "llava_next"), (build_tiny_llava_onevision(), "llava_onevision")):
        shape = model_shape(model)
        assert (shape.family, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (family, 4, 4, 2, 16)
    assert model_shape(build_tiny_llava_onevision()).visual_tokens == 16  # one crop, (28 / 7)^2


def test_cli_other_families(capsys):
    assert efficiency.main(["--model", "qwen3-vl-8b", "--visual-tokens", "400", "--keep", "400", "100"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-vl-8b: 36 layers" in out and "400 visual" in out
    assert [line.split()[0] for line in out.splitlines()[3:]] == ["400", "100"]
    for argv, option in ((["--model", "qwen2.5-vl-7b", "--measure"], "--measure"),
                         (["--model", "llava-onevision-7b", "--visual-tokens", "-3"], "--visual-tokens"),
                         (["--tiny", "--measure", "--visual-tokens", "9"], "--visual-tokens")):
        with pytest.raises(SystemExit) as info:
            efficiency.main(argv)
        assert info.value.code == 2
        assert option in capsys.readouterr().err
