"""Every visual-token compression baseline by name, and `build_compressor` to make one from plain settings.

`COMPRESSION_METHODS`: methods that compress a `(batch, N, D)` feature tensor (`TokenCompressor.forward`).
`MODEL_STAGE_METHODS`: methods that only run inside the model's vision encoder or language model (their
`stage` names the hook; they have no feature-tensor `forward`).
"""

from __future__ import annotations

from dataclasses import fields

from .method_deco import DeftLlavaDecoCompressor
from .method_divprune import DeftLlavaDivPruneCompressor
from .method_fastv import DeftLlavaFastVCompressor
from .method_ficoco_l import DeftLlavaFiCoCoLCompressor
from .method_ficoco_v import DeftLlavaFiCoCoVCompressor
from .method_random import DeftLlavaRandomCompressor
from .method_recoverable import DeftLlavaRecoverableCompressor
from .method_tome import DeftLlavaToMeCompressor
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
MODEL_STAGE_METHODS: dict[str, type[TokenCompressor]] = {
    cls.name: cls
    for cls in (
        DeftLlavaToMeCompressor,
        DeftLlavaFiCoCoVCompressor,
        DeftLlavaFastVCompressor,
        DeftLlavaFiCoCoLCompressor,
    )
}
ALL_METHODS = {**COMPRESSION_METHODS, **MODEL_STAGE_METHODS}


def build_compressor(name: str, token_dim: int, settings: dict | None = None) -> TokenCompressor:
    """Make the compressor registered as `name` for features of width `token_dim`.

    Args:
        name: a key of `COMPRESSION_METHODS` or `MODEL_STAGE_METHODS`.
        token_dim: hidden_size of the image features it will compress.
        settings: keyword values for the method's `settings_class` (None or {} for its defaults).

    Raises:
        ValueError: unknown name, unknown settings key, or a settings value out of range.
    """
    if name not in ALL_METHODS:
        raise ValueError(f"unknown compression method {name!r}; valid methods: {sorted(ALL_METHODS)}")
    cls = ALL_METHODS[name]
    settings = dict(settings or {})
    valid = [f.name for f in fields(cls.settings_class)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown settings {unknown} for compression method {name!r}; valid settings: {valid}"
        )
    return cls(token_dim, cls.settings_class(**settings))
