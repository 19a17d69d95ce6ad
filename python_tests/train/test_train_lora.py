"""`python -m epic_ext.train --lora-r` end to end (DeepSpeed on CPU, tiny checkpoints): only the adapters and the
trained projector copy change (the base weights in the checkpoint are bit-identical to the checkpoint trained from),
the exported adapter loads with PeftModel.from_pretrained and the merged export with the family's from_pretrained,
and both give the same logits and generations; a killed run resumes to the same losses under ZeRO-3 with gradient
checkpointing; bad LoRA options are one-line errors."""

from __future__ import annotations

import pathlib

import pytest
import torch
from helpers.chat_assets import make_onevision_train_assets, make_qwen_train_assets
from helpers.next_assets import make_next_train_assets
from helpers.train_assets import make_train_assets
from helpers.train_runs import losses, one_error_line, resume_matches_uninterrupted, run_train

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
LORA = ("--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1")


@pytest.fixture(scope="module")
def llava_assets(tmp_path_factory):
    return make_train_assets(tmp_path_factory.mktemp("llava_lora"))


def _assets(request, family):
    if family == "llava":
        return request.getfixturevalue("llava_assets")
    root = request.config._tmp_path_factory.mktemp(f"{family}_lora")  # noqa: SLF001
    if family == "llava_onevision":
        return make_onevision_train_assets(root)
    if family == "llava_next":
        return make_next_train_assets(root)
    return make_qwen_train_assets(root, family)


def _inputs(fam, assets, processor, count: int = 3) -> dict:
    """Model inputs of the first `count` training samples (the family's dataset, collated left-padded)."""
    import json

    from epic_ext.data.llava import collate
    from epic_ext.distill import MODEL_INPUT_KEYS

    data = pathlib.Path(assets["data"]).read_text()
    records = json.loads(data) if data.lstrip().startswith("[") else [json.loads(line) for line in data.splitlines() if line]
    dataset = fam.dataset(records[:count], assets["images"], processor, max_length=128)
    batch = collate([dataset[i] for i in range(count)], processor.tokenizer.pad_token_id, padding_side="left")
    return {key: batch[key] for key in ("input_ids", "attention_mask", *MODEL_INPUT_KEYS) if batch.get(key) is not None}


def _module_state(out_dir: pathlib.Path, step: int) -> dict:
    """The model weights of a ZeRO 0-2 checkpoint (DeepSpeed's mp_rank_00_model_states.pt)."""
    path = out_dir / "checkpoints" / f"step{step:07d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _base_key(key: str) -> str | None:
    """The plain model's key of a trained model's key (None: an adapter or a trained copy)."""
    if ".lora_" in key or ".modules_to_save." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_only_adapters_and_projector_change_and_export_loads(family, request, tmp_path):
    from peft import PeftModel

    from epic_ext.models.families import family_of_checkpoint

    assets = _assets(request, family)
    out = tmp_path / "run"
    evaluation = ("--eval-data", assets["test"]) if family == "llava" else ()  # the merged export, evaluated
    proc = run_train(assets, out, "--zero", "2", "--max-steps", "4", "--save-steps", "4", "--schedule", "tcd",
                     "--lam", "0.7", "--freeze-vision", *LORA, "--export", "--merge-lora", *evaluation)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    if evaluation:
        assert "exact-match accuracy" in proc.stdout, proc.stdout[-2000:]
    fam = family_of_checkpoint(assets["model"])
    base = fam.load_model(assets["model"], torch.float32)
    base_state = base.state_dict()
    trained = _module_state(out, 4)
    seen = set()
    changed_adapters, changed_projector = 0, 0
    for key, value in trained.items():
        plain = _base_key(key)
        if plain is None:
            if ".lora_B." in key:
                changed_adapters += int(value.abs().sum() > 0)  # B starts at zero
            if ".modules_to_save." in key:
                original = base_state[key.replace(".modules_to_save.default.", ".")]
                changed_projector += int(not torch.equal(value, original))
            continue
        seen.add(plain)
        assert torch.equal(value, base_state[plain]), f"{key} changed"
    assert seen == set(base_state)  # every base weight was compared
    layers = base.config.text_config.num_hidden_layers
    assert changed_adapters == 7 * layers
    assert changed_projector > 0

    # the export: the adapter on the base checkpoint, and the merged model, give the same outputs
    final = out / "final"
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "config.json").is_file()
    merged = fam.load_model(str(final), torch.float32).eval()
    adapted = PeftModel.from_pretrained(fam.load_model(assets["model"], torch.float32), str(final / "adapter")).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    processor = fam.load_processor(str(final))
    inputs = _inputs(fam, assets, processor)
    with torch.no_grad():
        a = merged(**inputs).logits
        b = adapted(**inputs).logits
        c = base(**inputs).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)  # the training changed the model
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(merged.generate(**inputs, **gen), adapted.generate(**inputs, **gen))


@pytest.mark.parametrize("zero", ["0", "1"])
def test_adapter_export_without_merge(llava_assets, tmp_path, zero):
    """Without --merge-lora, OUTPUT_DIR/final is the adapter and the processor; the trained vision tower
    (--no-freeze-vision) and projector come back with PeftModel.from_pretrained."""
    from peft import PeftModel

    from epic_ext.models.families import family_of_checkpoint

    out = tmp_path / "run"
    run_train(llava_assets, out, "--zero", zero, "--max-steps", "2", "--save-steps", "2", *LORA, "--export")
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    fam = family_of_checkpoint(llava_assets["model"])
    adapted = PeftModel.from_pretrained(fam.load_model(llava_assets["model"], torch.float32), str(final))
    trained = _module_state(out, 2)
    state = adapted.get_base_model().state_dict()
    assert set(state) == set(trained)
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    assert any(".vision_tower.modules_to_save." in key for key in trained)
    fam.load_processor(str(final))


def test_resume_reproduces_losses_zero3_gradient_checkpointing(llava_assets, tmp_path):
    """Also the ZeRO-3 export (weights gathered): the resumed run's merged model equals the uninterrupted one's. The
    bundled ZeRO-3 config keeps parameters under 1e5 elements whole on every rank (every parameter of the tiny
    model): this run partitions them all."""
    import json

    from safetensors.torch import load_file

    from epic_ext.train.config import CONFIG_DIR

    ds = json.loads((CONFIG_DIR / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_file = tmp_path / "zero3_partitioned.json"
    ds_file.write_text(json.dumps(ds))
    resume_matches_uninterrupted(llava_assets, tmp_path, "--deepspeed-config", str(ds_file),
                                 "--gradient-checkpointing", *LORA,
                                 "--max-steps", "6", "--save-steps", "3", "--schedule", "tcd", "--lam", "0.7",
                                 "--export", "--merge-lora")
    full, cut = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("full", "cut"))
    base = load_file(pathlib.Path(llava_assets["model"]) / "model.safetensors")
    assert set(full) == set(cut) == set(base)
    for key in full:
        torch.testing.assert_close(cut[key], full[key], rtol=1e-5, atol=1e-6)
    changed = [key for key in full if not torch.equal(full[key], base[key])]
    for part in ("language_model", "projector", "vision_tower"):  # run_train trains the vision tower
        assert any(part in key for key in changed), part
    # the LoRA options shape the model: a resume may not change them
    proc = run_train(llava_assets, tmp_path / "cut", "--deepspeed-config", str(ds_file), "--gradient-checkpointing",
                     "--lora-r", "8", "--lora-alpha", "8", "--lora-dropout", "0.1", "--max-steps", "6",
                     "--save-steps", "3", "--schedule", "tcd", "--lam", "0.7", "--resume", "auto", check=False)
    assert "--lora-r 8 (checkpoint: 4)" in one_error_line(proc)


@pytest.mark.parametrize("extra, expected", [
    (("--lora-r", "0"), "--lora-r must be >= 1"),
    (("--lora-r", "-2"), "--lora-r must be >= 1"),
    (("--lora-r", "4", "--lora-target", "q_proj,qkv_proj"), "--lora-target: qkv_proj is not a linear layer"),
    (("--merge-lora",), "--merge-lora need --lora-r"),
    (("--lora-r", "4", "--lora-dropout", "1.5"), "--lora-dropout must be in [0, 1)"),
    (("--lora-r", "4", "--freeze-llm"), "--freeze-llm with --lora-r"),
    (("--lora-r", "4", "--eval-data", "TEST"), "--eval-data with --lora-r evaluates the merged model"),
])
def test_bad_lora_options_are_one_line_errors(llava_assets, tmp_path, extra, expected):
    extra = [llava_assets["test"] if value == "TEST" else value for value in extra]
    proc = run_train(llava_assets, tmp_path / "run", "--max-steps", "1", *extra, check=False)
    line = one_error_line(proc)
    assert expected in line, line
    assert "DeepSpeed" not in proc.stderr and not (tmp_path / "run").exists()  # before start-up


def test_two_processes_zero3_export(llava_assets, tmp_path):
    """Two ranks under ZeRO-3 (every parameter partitioned): the export gathers the adapters from both, the merged
    model differs from the base only in the adapted projections and the projector, and base + adapter equals it."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    from epic_ext.models.families import family_of_checkpoint
    from epic_ext.train.config import CONFIG_DIR

    ds = json.loads((CONFIG_DIR / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_file = tmp_path / "zero3_partitioned.json"
    ds_file.write_text(json.dumps(ds))
    out = tmp_path / "run"
    run_train(llava_assets, out, "--deepspeed-config", str(ds_file), "--freeze-vision", *LORA, "--max-steps", "3",
              "--micro-batch-size", "2", "--export", "--merge-lora", nproc=2)
    assert sorted(losses(out)) == [1, 2, 3]
    merged = load_file(out / "final" / "model.safetensors")
    base = load_file(pathlib.Path(llava_assets["model"]) / "model.safetensors")
    assert set(merged) == set(base)
    changed = {key for key in merged if not torch.equal(merged[key], base[key])}
    adapted = {key for key in changed if key.rsplit(".", 2)[-2] in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert len(adapted) == 7 * 2 and all("language_model" in key and ".layers." in key for key in adapted)
    assert changed - adapted and all("multi_modal_projector" in key for key in changed - adapted)
    fam = family_of_checkpoint(llava_assets["model"])
    peft_model = PeftModel.from_pretrained(fam.load_model(llava_assets["model"], torch.float32),
                                           str(out / "final" / "adapter"))
    exported = fam.load_model(str(out / "final"), torch.float32).state_dict()
    for key, value in peft_model.merge_and_unload().state_dict().items():
        torch.testing.assert_close(value, exported[key], rtol=1e-6, atol=1e-7)
