"""The only module of epic_ext that touches transformers internals.

Every function, private name, registry and calling convention of transformers that the package relies on is
reached through here, each with a note of what it relies on. Public, documented API (`from_pretrained`,
`AutoConfig`, `generate`, model classes) may be used elsewhere; nothing else imports from `transformers.*`
submodules. When a release moves something, the change belongs in this file alone, and `make test-compat`
exercises the lowest supported release and the newest one that installs.

Known moves absorbed here:
- 5.24 renamed the cache keyword from `past_key_values` to `cache` in `create_causal_mask`, the decoder layers,
  the attention modules, the model forwards and the output dataclasses (`past_key_values=` is deprecated until
  5.40; when both arrive, the layer uses `cache=None`, so a forward that passes the old name writes no KV cache).
- 5.17 needs 2-D position ids for the rotary embedding (callers expand before gathering).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from typing import Any, Callable

import torch

_logger = logging.getLogger("epic_ext.models")

# The supported range (also in pyproject.toml): from the lowest release `make test-compat` runs to the newest one
# tested (pinned for `make test` in constraints.txt), patch releases included. Newer ones are used with one warning:
# most releases do not move what we touch, and `make test-compat` tries the newest installable one.
MIN_VERSION = "5.17.0"
MAX_TESTED_VERSION = "5.25.0"
SUPPORTED_RANGE = ">=5.17,<5.26"

_warned_version = False


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, Any]:
    try:
        import transformers  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"epic_ext.models needs transformers{SUPPORTED_RANGE}: "
                          f"pip install 'transformers>={MIN_VERSION}'") from exc
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_VERSION):
        raise ImportError(f"epic_ext.models needs transformers>={MIN_VERSION} (found {transformers.__version__}); "
                          f"the tested range is {SUPPORTED_RANGE}")
    # cache_utils.DynamicCache: the default cache; its `layers[i].keys/values` are read for KV bytes.
    from transformers import cache_utils  # noqa: PLC0415
    # masking_utils.create_causal_mask(config, inputs_embeds, attention_mask, <cache kw>, position_ids, layer_idx=)
    # builds the mask of one layer type; AttentionMaskInterface is the registry of mask builders per attention name.
    from transformers import masking_utils  # noqa: PLC0415
    # modeling_outputs.BaseModelOutputWithPast: what a language model's forward returns.
    from transformers import modeling_outputs  # noqa: PLC0415
    # modeling_utils.ALL_ATTENTION_FUNCTIONS / AttentionInterface: the attention registry the layers dispatch on by
    # config._attn_implementation.
    from transformers import modeling_utils  # noqa: PLC0415

    return dict(transformers=transformers, cache_utils=cache_utils, masking_utils=masking_utils,
                modeling_outputs=modeling_outputs, modeling_utils=modeling_utils)


def version() -> str:
    return _modules()["transformers"].__version__


def check_version() -> None:
    """Logs one warning (per process) when the installed transformers is newer than the tested range."""
    global _warned_version
    found = version()
    if _warned_version or _version_tuple(found)[:2] <= _version_tuple(MAX_TESTED_VERSION)[:2]:
        return
    _warned_version = True
    _logger.warning("epic_ext.models is tested with transformers %s; found %s, outside that range: check the results "
                    "(make test-compat runs the tests against a given release)", SUPPORTED_RANGE, found)


# ------------------------------------------------------------------------------------------------- cache keyword --
@functools.lru_cache(maxsize=None)
def cache_keyword() -> str:
    """'cache' (5.24+) or 'past_key_values' (up to 5.23): read from create_causal_mask's signature, which moved in
    the same release as the decoder layers and the model forwards."""
    parameters = inspect.signature(_modules()["masking_utils"].create_causal_mask).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    raise RuntimeError(f"epic_ext: transformers {version()} create_causal_mask takes neither cache= nor "
                       f"past_key_values= (tested: {SUPPORTED_RANGE})")


def cache_kwargs(cache) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a decoder layer, an attention module or a model forward (all renamed
    together in 5.24)."""
    return {cache_keyword(): cache}


def pop_incoming_cache(past_key_values, kwargs: dict):
    """The cache a replaced language-model forward was given, under either keyword (LlavaModel passes `cache=` from
    5.24, `past_key_values=` before). Removes it from kwargs so it is not passed on twice."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("epic_ext: got both cache= and past_key_values=; pass one")
    return cache if cache is not None else past_key_values


def output_cache(output):
    """The cache of a model output (`.cache` from 5.24, `.past_key_values` before; the old name warns in 5.24)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values


def new_dynamic_cache(config):
    # DynamicCache(config=...) builds per-layer caches of the right types (5.x).
    return _modules()["cache_utils"].DynamicCache(config=config)


def require_dynamic_cache(cache) -> None:
    """Pruning gives layers >= K a shorter cache: only DynamicCache (independent, growing layers) holds that."""
    if cache is None:
        return
    dynamic = _modules()["cache_utils"].DynamicCache
    if not isinstance(cache, dynamic):
        raise NotImplementedError(
            f"epic_ext compression does not support {type(cache).__name__} (static KV caches included): pruning "
            "shortens the cache of layers >= K; use the default dynamic cache")


def cache_length(cache) -> int:
    # get_seq_length() reads layer 0, which is never pruned: the true (original-position) length.
    return cache.get_seq_length() if cache is not None else 0


def cache_layer_tensors(cache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(keys, values) of every layer of a DynamicCache (5.x: `cache.layers[i].keys / .values`)."""
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]


def base_model_output(last_hidden_state: torch.Tensor, cache):
    output_class = _modules()["modeling_outputs"].BaseModelOutputWithPast
    return output_class(last_hidden_state=last_hidden_state, **cache_kwargs(cache))


# ------------------------------------------------------------------------------------------------------- masks --
def create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx: int | None = None):
    """The stock causal-mask builder. `layer_idx` sizes the key length from that layer's cache (pruned layers are
    shorter); without it, layer 0's length is used."""
    create = _modules()["masking_utils"].create_causal_mask
    kwargs = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
              "position_ids": position_ids, **cache_kwargs(cache)}
    if layer_idx is not None:
        kwargs["layer_idx"] = layer_idx
    return create(**kwargs)


# --------------------------------------------------------------------------------------------------- attention --
def attention_function(name: str) -> Callable:
    # ALL_ATTENTION_FUNCTIONS[name]: what the layers call for config._attn_implementation == name.
    return _modules()["modeling_utils"].ALL_ATTENTION_FUNCTIONS[name]


def has_attention_function(name: str) -> bool:
    return name in _modules()["modeling_utils"].ALL_ATTENTION_FUNCTIONS


def eager_attention_function(attention_module) -> Callable:
    """`eager` is not in the registry: each modeling file defines eager_attention_forward beside its layers."""
    module = sys.modules[type(attention_module).__module__]
    function = getattr(module, "eager_attention_forward", None)
    if function is None:
        raise ValueError(f"apply_compression: {module.__name__} has no eager_attention_forward to wrap")
    return function


_REGISTERED: set[str] = set()  # attention names register_attention added (epic_ext_<original>)


def register_attention(name: str, function: Callable, mask_of: str) -> None:
    """Registers an attention function under `name` with the mask builder of `mask_of`.

    AttentionInterface.register / AttentionMaskInterface.register are classmethods writing the global mappings; item
    assignment on an instance would not reach create_causal_mask, which then passes mask None (left padding breaks).
    """
    modules = _modules()
    masks = modules["masking_utils"].AttentionMaskInterface
    mask_function = masks._global_mapping.get(mask_of)  # private: the mask builder registered per attention name
    if mask_function is None:
        raise ValueError(f"apply_compression: no mask function for attention implementation {mask_of!r}")
    modules["modeling_utils"].AttentionInterface.register(name, function)
    masks.register(name, mask_function)
    _REGISTERED.add(name)


def text_attention_implementation(text_config) -> str:
    # config._attn_implementation: the name the text model's layers dispatch on.
    return text_config._attn_implementation


def set_text_attention_implementation(model, text_config, name: str) -> None:
    """Switches only the language model: set_attn_implementation(name) would also switch the vision tower.

    Switching to a name register_attention added, or back from one (the original name, checked when the model got
    it), is a write of the config's field: set_attn_implementation checks and preloads by name, and for a name
    containing "flash" (epic_ext_flash_attention_2) it looks for a Hub kernel of that name
    (modeling_utils._check_and_adjust_attn_implementation -> lazy_import_flash_attention) and fails.
    """
    if name not in _REGISTERED and text_config._attn_implementation not in _REGISTERED:
        model.set_attn_implementation({"text_config": name})
    if text_config._attn_implementation != name:  # our own name, or a release whose setter skipped the text config
        text_config._attn_implementation_internal = name  # private backing field of _attn_implementation


@contextlib.contextmanager
def reporting_attention_implementation(config, name: str):
    """Inside the block, `config._attn_implementation` reads `name`.

    integrations.flash_attention.flash_attention_forward picks its kernels by `module.config._attn_implementation`
    (modeling_flash_attention_utils.lazy_import_flash_attention: "flash_attention_2" -> the flash_attn package, any
    other name -> a Hub kernel of that name): while the text model dispatches on epic_ext_flash_attention_2, the
    wrapped flash function must see the original name.
    """
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = saved


# ------------------------------------------------------------------------------------------------ forward glue --
def language_model_forward_decorators() -> list[Callable]:
    """The decorators of LlamaModel.forward (config defaults; output_hidden_states / attentions capture), applied to a
    replacement forward so it behaves like the stock one. Their home moved between releases."""
    decorators = []
    generic = _modules()["transformers"].utils.generic
    merge = getattr(generic, "merge_with_config_defaults", None)
    if merge is not None:
        decorators.append(merge)
    try:
        from transformers.utils.output_capturing import capture_outputs  # noqa: PLC0415
    except ImportError:
        capture_outputs = getattr(generic, "check_model_inputs", None)
    if capture_outputs is not None:
        decorators.append(capture_outputs)
    return decorators


def install_forward(module: torch.nn.Module, forward: Callable) -> None:
    """Replaces `module.forward` on the instance (not the class: a dynamic subclass loses output capture, which is
    keyed by class; not the decoder layers: 5.23+ checkpoints through the class forward)."""
    for decorator in reversed(language_model_forward_decorators()):
        forward = decorator(forward)
    module.forward = forward.__get__(module)


def remove_forward(module: torch.nn.Module) -> None:
    module.__dict__.pop("forward", None)


def decoder_layer_call(decoder_layer, hidden_states, *, attention_mask, position_embeddings, position_ids, cache,
                       use_cache, **kwargs):
    """Calls a decoder layer the way the stock loop does (keyword arguments; the cache keyword of the release)."""
    return decoder_layer(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                         position_ids=position_ids, use_cache=use_cache, **cache_kwargs(cache), **kwargs)


def attention_call(attention_module, hidden_states, *, attention_mask, position_embeddings, position_ids, **kwargs):
    """Calls a self-attention module without a cache (the K = 0 dry scoring call)."""
    return attention_module(hidden_states=hidden_states, attention_mask=attention_mask,
                            position_embeddings=position_embeddings, position_ids=position_ids, **cache_kwargs(None),
                            **kwargs)


# -------------------------------------------------------------------------------------------------- the demo --
def clip_image_processor_class():
    """The PIL CLIP image processor (no torchvision needed); its module path is not part of the public API."""
    from transformers.models.clip import image_processing_pil_clip  # noqa: PLC0415

    return image_processing_pil_clip.CLIPImageProcessorPil


# -------------------------------------------------------------------------------------- activation checkpointing --
def enable_activation_checkpointing(model, *, use_reentrant: bool = False) -> None:
    """5.24 renamed gradient_checkpointing_enable(gradient_checkpointing_kwargs=) to
    activation_checkpointing_enable(activation_checkpointing_kwargs=); the old name warns until v6."""
    settings = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def disable_activation_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


# ------------------------------------------------------------------------------------------------------- Qwen --
# Qwen2_5_VLTextModel / Qwen3VLTextModel, the same conventions in 5.17 and 5.24 (line numbers of 5.24's
# q25 = models/qwen2_5_vl/modeling_qwen2_5_vl.py and q3 = models/qwen3_vl/modeling_qwen3_vl.py):
# - position ids arrive as [3, B, L] (get_rope_index: t, h, w) or [4, B, L] (generate's
#   _prepare_position_ids_for_generation prepends the 1-D text row); the forwards split them (q25:817-823,
#   q3:795-799) and give the text row to create_causal_mask and the decoder layers' position_ids=.
# - The rotary embedding takes the 3 M-RoPE rows; 5.17's indexes position_ids[:, :, None, :] and sizes by
#   position_ids.shape[1], so it needs [3, B, L] with the full batch (5.24 expands [B, L] itself).
# - Qwen3-VL's deepstack: the language model receives visual_pos_masks and deepstack_visual_embeds (q3:1235-1243) and
#   adds level i after decoder layer i (q3:826-832, _deepstack_process q3:841).
# - A sliding-window Qwen2.5-VL builds one mask per config.layer_types entry (q25:834-842): refused by the engine.
QWEN_TEXT_ROWS = 1  # [4, B, L] position ids: row 0 is the 1-D "text" position, rows 1..3 are M-RoPE (t, h, w)
QWEN_ROPE_ROWS = 3


def qwen_split_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text models' split of their position ids: [4, B, L] -> (rows 1..3 for the rotary embedding, row 0 for
    create_causal_mask and the decoder layers' `position_ids=`); [3, B, L] -> (all rows, None). The text row only
    feeds packed-sequence detection (the mask builder with no 2-D mask and no cache; flash attention with batch 1)."""
    if position_ids.dim() != 3 or position_ids.shape[0] not in (QWEN_ROPE_ROWS, QWEN_ROPE_ROWS + QWEN_TEXT_ROWS):
        raise ValueError(f"position_ids: expected [3, B, L] or [4, B, L] M-RoPE ids, got {tuple(position_ids.shape)}")
    if position_ids.shape[0] == QWEN_ROPE_ROWS + QWEN_TEXT_ROWS:
        return position_ids[QWEN_TEXT_ROWS:], position_ids[0]
    return position_ids, None


def qwen_pop_deepstack(kwargs: dict) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """Qwen3VLModel hands the language model `visual_pos_masks` [B, L] bool (image | video tokens) and
    `deepstack_visual_embeds`, one [n_visual, D] tensor per vision deepstack level, rows in the row-major order of
    visual_pos_masks; both None on decoding steps. Popped so they do not reach the decoder layers."""
    return kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)


def qwen_add_deepstack(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                       visual_embeds: torch.Tensor) -> torch.Tensor:
    """Qwen3VLTextModel._deepstack_process: level i is added to the visual rows after decoder layer i (out of place:
    the layer output may be needed by autograd)."""
    visual_pos_masks = visual_pos_masks.to(hidden_states.device)
    hidden_states = hidden_states.clone()
    hidden_states[visual_pos_masks, :] = hidden_states[visual_pos_masks, :] + visual_embeds.to(
        hidden_states.device, hidden_states.dtype)
    return hidden_states


def qwen_rope_deltas(model_module) -> torch.Tensor | None:
    """Qwen2_5_VLModel / Qwen3VLModel.rope_deltas [B|1, 1]: stored by get_rope_index at the prefill (q25:1151,
    q3:1115). Decoding without position_ids and without an attention mask adds it to `cache.get_seq_length()`
    (compute_3d_position_ids, q25:1156-1167, q3:1119-1130), i.e. to cache layer 0's length."""
    return getattr(model_module, "rope_deltas", None)


# ------------------------------------------------------------------------------------------- image processors --
_TORCHVISION: list[bool] = []


def torchvision_available() -> bool:
    """Whether torchvision imports and registers its ops here (the index's torchvision built against a CUDA torch
    imports with a CPU torch but fails: `operator torchvision::nms does not exist`). transformers builds the video
    processors and the torchvision image backends only with it."""
    if not _TORCHVISION:
        try:
            import torchvision  # noqa: F401, PLC0415

            _TORCHVISION.append(True)
        except Exception:  # noqa: BLE001 - RuntimeError from a torchvision built for another torch, ImportError
            _TORCHVISION.append(False)
    return _TORCHVISION[0]


def auto_processor(path: str, pil: bool = False, processor_class: str | None = None, **kwargs):
    """The checkpoint's AutoProcessor (`kwargs` override its settings, e.g. min_pixels / max_pixels); `pil`: with
    its image processor's PIL backend (the fallback path, and every processor without torchvision) instead of the
    torchvision one. A checkpoint that names no processor class (AutoProcessor then returns its tokenizer alone)
    gets `processor_class` (the family's, e.g. Qwen2_5_VLProcessor) built from its files."""
    transformers = _modules()["transformers"]
    if pil and torchvision_available():
        kwargs["backend"] = "pil"
    processor = transformers.AutoProcessor.from_pretrained(path, **kwargs)
    if processor_class and getattr(processor, "image_processor", None) is None:
        processor = getattr(transformers, processor_class).from_pretrained(path, **kwargs)
    return processor


def image_processor_from_pretrained(path: str, pil: bool = False):
    """The checkpoint's image processor. AutoImageProcessor picks the PIL backend by itself when torchvision is
    missing from 5.24 on; 5.17's AutoImageProcessor raises ImportError there, while the top-level class named by
    preprocessor_config.json's `image_processor_type` (e.g. Qwen2VLImageProcessor) falls back to its PIL twin in
    both releases. `pil`: its PIL backend even where torchvision is importable (the fallback path)."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    transformers = _modules()["transformers"]
    try:
        if pil and torchvision_available():
            return transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
        return transformers.AutoImageProcessor.from_pretrained(path)
    except ImportError:
        config_file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(config_file):
            raise
        with open(config_file, encoding="utf-8") as handle:
            name = json.load(handle).get("image_processor_type")
        image_processor_class = getattr(transformers, name, None) if name else None
        if image_processor_class is None:
            raise
        return image_processor_class.from_pretrained(path)
