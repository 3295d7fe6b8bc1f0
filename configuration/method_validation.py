"""Config-time validation of the baseline compression methods' names and settings."""

from __future__ import annotations

import math

# baselines that run inside DeftLlavaForConditionalGeneration (the others exist as standalone compressors)
MODEL_METHODS = ("random", "uniform", "deco", "divprune", "visionzip")


def validate_method(name: str, settings: dict | None, num_tokens: int | None, num_kept: int | None) -> None:
    """Raise ValueError for an unknown method, invalid settings, or a budget the method cannot produce."""
    from ..compression_registry import build_compressor

    if name not in MODEL_METHODS:
        raise ValueError(
            f"compression_method {name!r} cannot run inside the model; valid: 'deft' or one of {MODEL_METHODS}"
        )
    build_compressor(name, 8, settings)  # unknown keys and out-of-range values raise here
    if name == "deco" and num_kept is not None:
        side = math.isqrt(num_kept)
        if side * side != num_kept:
            lower, upper = side * side, (side + 1) ** 2
            raise ValueError(
                f"deco pools to a square grid: the retention ratio gives {num_kept} of {num_tokens} tokens, "
                f"which is not a perfect square; choose a ratio giving {lower} or {upper} tokens"
            )
