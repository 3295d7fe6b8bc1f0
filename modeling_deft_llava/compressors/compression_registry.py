"""Every compression method by name: the only list of method names in the project.

`METHODS` maps `config.compression_method` to the method's class (one `method_<name>.py` each). Config
validation and the processor's placeholder count (`placeholder_policy.py`) and the model all ask this registry.
Adding a method: write `method_<name>.py` (a `TokenCompressor` for a features method, or a `CompressionMethod`
with the hooks it needs), add one line below, and one entry in the parameterised test settings
(`SETTINGS` in `tests/test_model_methods.py`).
"""

from __future__ import annotations

import difflib

from .compression_method import CompressionMethod
from .method_cdpruner import DeftLlavaCDPrunerCompressor
from .method_deco import DeftLlavaDecoCompressor
from .method_deft import DeftLlavaDeFTCompressor
from .method_divprune import DeftLlavaDivPruneCompressor
from .method_fastv import DeftLlavaFastVCompressor
from .method_ficoco_l import DeftLlavaFiCoCoLCompressor
from .method_ficoco_v import DeftLlavaFiCoCoVCompressor
from .method_prunesid import DeftLlavaPruneSIDCompressor
from .method_random import DeftLlavaRandomCompressor
from .method_recoverable import DeftLlavaRecoverableCompressor
from .method_tome import DeftLlavaToMeCompressor
from .method_uniform import DeftLlavaUniformCompressor
from .method_visionzip import DeftLlavaVisionZipCompressor
from .token_compressor import TokenCompressor

METHODS: dict[str, type[CompressionMethod]] = {
    cls.name: cls
    for cls in (
        DeftLlavaDeFTCompressor,  # the project's own method, the default
        DeftLlavaRandomCompressor,
        DeftLlavaUniformCompressor,
        DeftLlavaDecoCompressor,
        DeftLlavaDivPruneCompressor,
        DeftLlavaVisionZipCompressor,
        DeftLlavaRecoverableCompressor,
        DeftLlavaToMeCompressor,
        DeftLlavaFiCoCoVCompressor,
        DeftLlavaFastVCompressor,
        DeftLlavaFiCoCoLCompressor,
        DeftLlavaCDPrunerCompressor,
        DeftLlavaPruneSIDCompressor,
    )
}
DEFAULT_METHOD = DeftLlavaDeFTCompressor.name
# the baselines users compare DeFT with
BASELINE_METHODS: dict[str, type[CompressionMethod]] = {
    name: cls for name, cls in METHODS.items() if name != DEFAULT_METHOD
}
# baselines that compress a `(batch, N, D)` feature tensor on their own (`TokenCompressor.forward`)
COMPRESSION_METHODS: dict[str, type[TokenCompressor]] = {
    name: cls
    for name, cls in BASELINE_METHODS.items()
    if issubclass(cls, TokenCompressor) and cls.compress is not TokenCompressor.compress
}


def method_class(name) -> type[CompressionMethod]:
    """The class registered as `name`.

    Raises:
        ValueError: `name` is not a registered method (names the valid ones and the closest).
    """
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name.lower(), METHODS, n=1) if isinstance(name, str) else []
    raise ValueError(
        f"compression_method {name!r} cannot run inside the model; valid: {DEFAULT_METHOD!r} or one of "
        f"{tuple(BASELINE_METHODS)}" + (f"; did you mean {close[0]!r}?" if close else "")
    )


def method_settings(name: str, settings: dict | None):
    """An instance of the method's `settings_class` from plain `compression_settings`.

    Raises:
        ValueError: unknown method, unknown settings key, or a settings value out of range.
    """
    return method_class(name).parse_settings(settings)


def build_method(config) -> CompressionMethod:
    """The method `config.compression_method` names, built from the config."""
    method_settings(config.compression_method, config.compression_settings)  # names unknown keys
    return method_class(config.compression_method).from_config(config)


def build_compressor(name: str, token_dim: int, settings: dict | None = None) -> TokenCompressor:
    """Make the baseline registered as `name` for features of width `token_dim` (tests, benchmarks).

    Raises:
        ValueError: unknown name, DeFT (built from a config: `build_method`), unknown settings key, or a
            settings value out of range.
    """
    if name not in METHODS:
        raise ValueError(f"unknown compression method {name!r}; valid methods: {sorted(BASELINE_METHODS)}")
    if name not in BASELINE_METHODS:
        raise ValueError(f"{name!r} is built from a DeftLlavaConfig (build_method), not from plain settings")
    return METHODS[name](token_dim, method_settings(name, settings))


__all__ = [
    "BASELINE_METHODS",
    "COMPRESSION_METHODS",
    "DEFAULT_METHOD",
    "METHODS",
    "build_compressor",
    "build_method",
    "method_class",
    "method_settings",
]
