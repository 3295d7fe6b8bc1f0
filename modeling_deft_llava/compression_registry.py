"""Every visual-token compression baseline by name, and `build_compressor` to make one from plain settings."""

from __future__ import annotations

from dataclasses import fields

from .method_deco import DeftLlavaDecoCompressor
from .method_divprune import DeftLlavaDivPruneCompressor
from .method_random import DeftLlavaRandomCompressor
from .method_recoverable import DeftLlavaRecoverableCompressor
from .method_uniform import DeftLlavaUniformCompressor
from .method_visionzip import DeftLlavaVisionZipCompressor
from .token_compressor import TokenCompressor

COMPRESSION_METHODS: dict[str, type[TokenCompressor]] = {
    cls.name: cls
    for cls in (
        DeftLlavaRandomCompressor,
        DeftLlavaUniformCompressor,
        DeftLlavaDecoCompressor,
        DeftLlavaDivPruneCompressor,
        DeftLlavaVisionZipCompressor,
        DeftLlavaRecoverableCompressor,
    )
}


def build_compressor(name: str, token_dim: int, settings: dict | None = None) -> TokenCompressor:
    """Make the compressor registered as `name` for features of width `token_dim`.

    Args:
        name: a key of `COMPRESSION_METHODS`.
        token_dim: hidden_size of the image features it will compress.
        settings: keyword values for the method's `settings_class` (None or {} for its defaults).

    Raises:
        ValueError: unknown name, unknown settings key, or a settings value out of range.
    """
    if name not in COMPRESSION_METHODS:
        raise ValueError(f"unknown compression method {name!r}; valid methods: {sorted(COMPRESSION_METHODS)}")
    cls = COMPRESSION_METHODS[name]
    settings = dict(settings or {})
    valid = [f.name for f in fields(cls.settings_class)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown settings {unknown} for compression method {name!r}; valid settings: {valid}"
        )
    return cls(token_dim, cls.settings_class(**settings))
