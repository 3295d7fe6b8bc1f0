"""Config-time validation of the baseline compression methods' names and settings."""

from __future__ import annotations

import math

from .deft_settings import (
    BASELINE_METHODS,
    FULL_PLACEHOLDER_METHODS,
    num_kept_tokens,
    validate_compression_method,
)
from .vision_towers import check_cls_token

# baselines that run inside DeftLlavaForConditionalGeneration; where each runs is its compressor's `stage`
MODEL_METHODS = BASELINE_METHODS
# stages whose processor writes all N placeholders (the model keeps K per image itself)
FULL_PLACEHOLDER_STAGES = ("features_with_text", "language_model")


def validate_method(
    name: str, settings: dict | None, num_tokens: int | None, num_kept: int | None, config=None
) -> None:
    """Raise ValueError for an unknown method, invalid settings, or a budget the method cannot produce.

    Args:
        num_tokens: N patch tokens per image (None when the vision config does not say).
        num_kept: placeholders per image under this config (None without compression).
        config: the `DeftLlavaConfig` being built, for checks that need layer counts (tome, fastv, ficoco_l).
    """
    from ..compressors.compression_registry import ALL_METHODS, build_compressor

    if name not in MODEL_METHODS:
        validate_compression_method(name)  # not a method at all: names the valid ones
        raise ValueError(
            f"compression_method {name!r} is DeFT itself, not a baseline: nothing to validate here"
        )
    compressor = build_compressor(name, 8, settings)  # unknown keys and out-of-range values raise here
    full = ALL_METHODS[name].stage in FULL_PLACEHOLDER_STAGES
    if full != (name in FULL_PLACEHOLDER_METHODS):  # a developer error: the two lists drifted apart
        raise ValueError(f"{name}: stage {ALL_METHODS[name].stage!r} disagrees with FULL_PLACEHOLDER_METHODS")
    if name == "deco" and num_kept is not None:
        side = math.isqrt(num_kept)
        if side * side != num_kept:
            lower, upper = side * side, (side + 1) ** 2
            raise ValueError(
                f"deco pools to a square grid: the retention ratio gives {num_kept} of {num_tokens} tokens, "
                f"which is not a perfect square; choose a ratio giving {lower} or {upper} tokens"
            )
    if config is None:
        return
    if ALL_METHODS[name].needs_cls_token:
        without = ("deft",) + tuple(m for m in MODEL_METHODS if not ALL_METHODS[m].needs_cls_token)
        check_cls_token(name, config, without)
    if name in ("tome", "ficoco_v"):
        _validate_encoder_stage(name, config, num_tokens, compressor.settings)
    if name in ("fastv", "ficoco_l"):
        layers = config.text_config.num_hidden_layers
        setting = compressor.layer_setting  # fastv_layer / ficoco_l_layer
        cut = getattr(compressor.settings, setting)
        if not 1 <= cut <= layers - 1:
            raise ValueError(
                f"{setting} must be in [1, {layers - 1}] for a {layers}-layer language model "
                f"(layers before it see every token, the rest the kept ones), got {cut}"
            )


def _validate_encoder_stage(name: str, config, num_tokens: int | None, settings) -> None:
    """tome and ficoco_v run the CLIP layers up to the feature layer themselves: check layer and budget."""
    from ..compressors.method_ficoco_v import ficoco_v_schedule
    from ..compressors.method_tome import tome_layers_run, tome_schedule

    layer = config.vision_feature_layer  # a single int: `check_cls_token` ran first
    run = tome_layers_run(config.vision_config.num_hidden_layers, layer)
    if name == "ficoco_v" and not 0 <= settings.start_layer < run:
        raise ValueError(
            f"ficoco_v start_layer must be in [0, {run - 1}]: vision_feature_layer={layer} is the output of "
            f"encoder layer {run - 1}, got {settings.start_layer}"
        )
    if num_tokens is not None and config.use_deft:
        kept = num_kept_tokens(num_tokens, config.deft_retention_ratio)
        if name == "tome":
            tome_schedule(num_tokens, kept, run)
        else:
            ficoco_v_schedule(num_tokens, kept, run, settings.start_layer)
