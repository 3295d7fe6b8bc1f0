"""Every place where DeFT-LLaVA relies on transformers internals, and the shims for the versions that differ.

Supported range: `configuration/supported_versions.py` (tested: the lowest and the newest admitted release run the
default suite in `.ci/run`). When a new transformers release comes out, check this list first; each entry names the
file that relies on it and what changed between the supported releases.

Version-dependent (handled here):
1. The cache's name. transformers 5.24 renamed `past_key_values` to `cache` everywhere: model `forward`
   arguments, decoder-layer arguments, output fields, `generate`'s model kwargs (`past_key_values` stays as a
   deprecated alias with a warning). `CACHE_NAME` is the installed name; `modeling_deft_llava.py` accepts both
   names in `forward` (`resolve_cache_argument`) and passes the installed one on; the layer runner of FastV and
   FiCoCo-L (`method_fastv.py`) calls each decoder layer with `CACHE_NAME`.
2. LLaVA's output classes. Up to 5.23 `LlavaModelOutputWithPast` has the field `image_hidden_states` (the
   projected features); from 5.24 they derive from `MultimodalBaseModelOutputWithPast` with `image_outputs` /
   `video_outputs` (the encoder outputs) and `image_hidden_states` is a read-only property (setting it raises
   `AttributeError`: the 5.24 breakage). `visual_output_fields` builds the right keyword arguments;
   `modeling_outputs_deft_llava.py` subclasses these classes.
3. Where `generate` encodes images. From 5.18 `generate` calls the inner model's `get_image_features` before the
   first forward and passes `mm_encoder_outputs` (expanded for beams by `_expand_multimodal_outputs`, which we
   override); before 5.18 it passes `pixel_values` to the prefill forward and expands them along the batch
   (one image per sample). Compression runs in `get_image_features` either way. `GENERATE_PRE_ENCODES`.

Stable across the supported range (relied on, re-checked on every supported version by the test suite):
4. Rewinding a cache. `DynamicLayer.reset()` before 5.23 zeroes the tensors but keeps their length (a re-run
   prefill then continues after zeros) and `crop(n)` with n > 0 changed meaning in 5.18. The `adaptive` RTD
   mode re-runs its prefill: `rewind_cache` crops by a negative count (same meaning in every supported release),
   and uses `reset()` only for an emptied static cache (`is_compileable`).
5. `LlavaModel.get_image_features(..., return_dict=True)` returns a `BaseModelOutputWithPooling` whose
   `pooler_output` is a list of per-image `(N, D)` features (`modeling_deft_llava.py`).
6. `GenerationMixin._update_model_kwargs_for_generation` (overridden: hands the kept original positions, the
   compacted mask and `deft_generation_state` back to `generate`) extends `position_ids` by last + 1 per step.
   `generate` validates model kwargs against the named parameters of `forward` (hence named `deft_*` args).
   `prepare_inputs_for_generation` calls `self.create_masks_for_generate` (overridden to keep the 2-D mask for
   static caches: compression needs it, the language model builds its own 4-D mask).
   Assisted and prompt-lookup decoding (`GenerationMixin._assisted_decoding`, overridden to note the prompt's
   length; `prepare_inputs_for_generation`, overridden to pass it to the first forward): the first forward is
   the prefill over the prompt and the first drafts; `_update_model_kwargs_for_generation` runs after the cache
   was cropped by `crop(-rejected)` and gets `num_new_tokens = accepted + 1`.
7. Caches: the model sets a plain attribute `deft_state` on transformers' `Cache` objects (`token_layout.py`)
   and relies on `get_seq_length()`, `crop()`, `reset()`, `is_compileable` (`rewind_cache` above).
8. Loading: `from_pretrained(key_mapping=...)` (legacy llava-hf key layout), `_tied_weights_keys` as a dict,
   `_keys_to_ignore_on_load_unexpected`, `_init_weights` / `post_init`, `LlavaMultiModalProjector` and
   `LlavaPreTrainedModel` from `transformers.models.llava.modeling_llava`, `can_return_tuple` from
   `transformers.utils.generic` (`modeling_deft_llava.py`, `convert.py`).
9. Decoder internals used by the layer runners of FastV / FiCoCo-L (`method_fastv.py`, `method_ficoco_l.py`):
   `language_model.layers`, `.rotary_emb`, `.norm`, each layer's `self_attn.{q,k}_proj`, `head_dim`, `scaling`,
   `num_key_value_groups`, and the decoder-layer call `layer(hidden, attention_mask=, position_ids=, <cache>=,
   use_cache=, position_embeddings=)`; `DynamicCache(config=)` and `get_seq_length(layer_idx)`.
10. Vision-encoder internals used by ToMe / FiCoCo-V / CLS attention (`method_tome.py`, `method_ficoco_v.py`,
   `vision_attention.py`): `vision_model.embeddings`, `.pre_layrnorm`, `.encoder.layers`, each layer's
   `layer_norm1/2`, `self_attn.{q,k,v,out}_proj`, `mlp`.
11. Processor hooks (`processing/processing_deft_llava.py`): `LlavaProcessor.replace_image_token`,
   `_get_num_multimodal_tokens`, `validate_inputs`; `ProcessorMixin.to_dict` saves only named `__init__`
   arguments.
12. Trainer (`training/trainer.py`): overrides the private `_save_checkpoint`, `_get_output_dir`,
    `_init_training_state` and `_finalize_training` (same signatures in 5.18-5.25), and the public
    `get_batch_samples` / `compute_loss`; relies on `model_accepts_loss_kwargs` being detected from `forward`'s
    `**kwargs` (then `num_items_in_batch` reaches the loss); reads `activation_checkpointing*` (5.23+) or
    `gradient_checkpointing*` (5.18) arguments; uses `trainer_utils.PREFIX_CHECKPOINT_DIR`.
13. Config (`configuration/configuration_deft_llava.py`): `LlavaConfig` is a `huggingface_hub` strict dataclass
    with `__post_init__`.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

from .configuration.supported_versions import check_transformers_version

check_transformers_version()

_RELEASE = Version(Version(transformers.__version__).base_version)

CACHE_NAME = "cache" if _RELEASE >= Version("5.24") else "past_key_values"
MULTIMODAL_OUTPUT_CLASSES = _RELEASE >= Version("5.24")
GENERATE_PRE_ENCODES = _RELEASE >= Version("5.18")


def resolve_cache_argument(cache, past_key_values):
    """The cache a `forward` was given under either name (`cache` from 5.24, `past_key_values` before).

    Raises:
        ValueError: both names were given different objects.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache) -> dict:
    """`{CACHE_NAME: cache}`: the keyword argument under which the installed transformers expects the cache."""
    return {CACHE_NAME: cache}


def cache_of(outputs):
    """The cache field of a transformers output object (None when absent)."""
    return getattr(outputs, CACHE_NAME, None)


def rewind_cache(cache, length: int) -> None:
    """Drop every cached token after the first `length` (the cache's state before a forward that is re-run).

    Raises:
        ValueError: `length` is negative or longer than the cache.
    """
    held = cache.get_seq_length()
    if not 0 <= length <= held:
        raise ValueError(f"cannot rewind a cache of {held} tokens to {length} tokens")
    if length == held:
        return
    if length == 0 and getattr(cache, "is_compileable", False):
        cache.reset()  # static layers: zeroed in place, their length counter goes back to 0
        return
    cache.crop(length - held)  # a negative count removes that many tokens (5.16 .. 5.24 alike)


def visual_output_fields(image_features_output, video_features_output) -> dict:
    """Keyword arguments of LLaVA's output classes that describe the visual features.

    5.24+: `image_outputs` / `video_outputs` (the encoder outputs; here `DeftVisualFeaturesOutput`, whose
    `pooler_output` are the rows that went into the placeholders). Before: `image_hidden_states`, the
    `(total_rows, hidden_size)` concatenation of those rows."""
    if MULTIMODAL_OUTPUT_CLASSES:
        return {"image_outputs": image_features_output, "video_outputs": video_features_output}
    if image_features_output is None or not image_features_output.pooler_output:
        return {"image_hidden_states": None}
    return {"image_hidden_states": torch.cat(list(image_features_output.pooler_output))}


__all__ = [
    "CACHE_NAME",
    "GENERATE_PRE_ENCODES",
    "MULTIMODAL_OUTPUT_CLASSES",
    "cache_kwargs",
    "cache_of",
    "resolve_cache_argument",
    "rewind_cache",
    "visual_output_fields",
]
