"""The placeholder policy and the config-time checks of the compression method, in one place.

How many placeholders the processor writes per image and per video, which methods can run on a config, and
the method's own config checks all come from the registry of methods (`compression_registry.py`): the method's
`settings_class` checks its values, its declarations say whether it reads the CLS token, compresses text or
videos, and its `check_config` checks layer counts and budgets. `configuration/` (the config classes) and
`processing/` (the processors) import this module; the rounding rule itself (`num_kept_tokens`) is data of
`configuration/deft_settings.py`, below every method.

Layers: this module imports the registry (and through it every method), `configuration.deft_settings` and
`configuration.vision_towers`; it never imports the config classes (they import it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configuration.deft_settings import DEFAULTS, DEFT_METHOD, num_kept_tokens, validate_deft_settings
from ..configuration.vision_towers import check_cls_token
from .compression_registry import METHODS, method_class, method_settings


def validate_compression_method(value, name="compression_method") -> None:
    """Raise `ValueError` naming the valid methods (and the closest one) unless `value` is a registered method."""
    method_class(value)


@dataclass(frozen=True)
class PlaceholderPolicyInputs:
    """What a method's placeholder policy (`writes_all_placeholders`) reads: the DeFT budget and mode, and the
    method's own `compression_settings` (PruneSID's `dynamic_budget` decides its count)."""

    deft_retention_ratio: float = DEFAULTS.deft_retention_ratio
    deft_inference_mode: str = DEFAULTS.deft_inference_mode
    compression_settings: dict | None = None

    def __post_init__(self):
        validate_deft_settings(
            deft_retention_ratio=self.deft_retention_ratio, deft_inference_mode=self.deft_inference_mode
        )


def placeholder_count(
    num_tokens: int,
    use_deft: bool,
    retention_ratio: float,
    inference_mode: str = DEFAULTS.deft_inference_mode,
    compression_method: str = DEFT_METHOD,
    compression_settings: dict | None = None,
) -> int:
    """Placeholders the processor writes for one image (or video) of `num_tokens` encoder tokens.

    The model and the processor both call this, so their counts cannot drift apart: N without compression or
    when the method's placeholder policy says so (`writes_all_placeholders`: DeFT's content-dependent RTD modes,
    methods that keep K inside the forward pass such as FastV, FiCoCo-L and Recoverable), K otherwise.

    Raises:
        ValueError: `compression_method` is not a registered method.
    """
    if writes_every_placeholder(
        use_deft, retention_ratio, inference_mode, compression_method, compression_settings
    ):
        return num_tokens
    return num_kept_tokens(num_tokens, retention_ratio)


def writes_every_placeholder(
    use_deft: bool,
    retention_ratio: float,
    inference_mode: str,
    compression_method: str,
    compression_settings: dict | None,
) -> bool:
    """True when the processor writes all N placeholders of an item: compression off, or the method's placeholder
    policy says so (`writes_all_placeholders`). Raises ValueError for an unregistered `compression_method`."""
    cls = method_class(compression_method)
    policy = PlaceholderPolicyInputs(
        deft_retention_ratio=retention_ratio,
        deft_inference_mode=inference_mode,
        compression_settings=compression_settings,
    )
    return not use_deft or cls.writes_all_placeholders(policy)


def anyres_placeholder_count(layout, settings) -> int:
    """Placeholders the processor writes for one AnyRes image, and the model expects: N without compression or
    when the method writes every placeholder (`writes_all_placeholders`: DeFT `hybrid`/`adaptive`, CDPruner; the
    model drops the unused rows), else `layout.count` (K of the token sets plus the kept newlines).

    Args:
        layout: the image's `AnyResLayout` (`configuration/anyres_settings.py`).
        settings: anything with the fields `use_deft`, `deft_retention_ratio`, `deft_inference_mode`,
            `compression_method`, `compression_settings`, `anyres_budget`, `anyres_image_newline` (a
            `DeftLlavaNextConfig` or a `DeftLlavaNextProcessor`).

    Raises:
        ValueError: an unknown `compression_method` or AnyRes setting.
    """
    if writes_every_placeholder(
        settings.use_deft,
        settings.deft_retention_ratio,
        settings.deft_inference_mode,
        settings.compression_method,
        settings.compression_settings,
    ):
        return layout.num_tokens
    return layout.count(settings.deft_retention_ratio, settings.anyres_budget, settings.anyres_image_newline)


def video_placeholder_count(
    tokens_per_frame: int,
    frames: int,
    use_deft: bool,
    retention_ratio: float,
    inference_mode: str = DEFAULTS.deft_inference_mode,
    compression_method: str = DEFT_METHOD,
    compression_settings: dict | None = None,
) -> int:
    """Placeholders the processor writes for one video of `frames` frames of `tokens_per_frame` encoder tokens.

    A method that compresses videos (DeFT: one budget over all `frames * tokens_per_frame` tokens) gets
    `placeholder_count` of the whole video; an image method applied frame by frame (`compresses_frames`)
    keeps `placeholder_count(tokens_per_frame)` per frame, `frames` times that in all (the same total when
    `ratio * tokens_per_frame` is a whole number).

    Raises:
        ValueError: `compression_method` is not a registered method.
    """
    args = (use_deft, retention_ratio, inference_mode, compression_method, compression_settings)
    settings = PlaceholderPolicyInputs(
        deft_retention_ratio=retention_ratio,
        deft_inference_mode=inference_mode,
        compression_settings=compression_settings,
    )
    if use_deft and method_class(compression_method).compresses_frames(settings):
        return frames * placeholder_count(tokens_per_frame, *args)
    return placeholder_count(tokens_per_frame * frames, *args)


def video_capable_methods(config) -> list[str]:
    """Registered methods that compress videos, natively or frame by frame (`config`'s budget and mode; each
    method with its default `compression_settings`, `config`'s belong to its own method)."""
    defaults = PlaceholderPolicyInputs(
        deft_retention_ratio=config.deft_retention_ratio,
        deft_inference_mode=config.deft_inference_mode,
        compression_settings=None,
    )
    return [n for n, c in METHODS.items() if "video" in c.modalities or c.compresses_frames(defaults)]


def validate_method(config, num_tokens: int | None, num_kept: int | None) -> None:
    """Raise ValueError for an unknown method, invalid settings, or a config the method cannot run on.

    Args:
        config: the `DeftLlavaConfig` being built.
        num_tokens: N patch tokens per image (None when the vision config does not say).
        num_kept: placeholders per image under this config (None without compression).
    """
    name = config.compression_method
    cls = method_class(name)  # not a method at all: names the valid ones
    settings = method_settings(name, config.compression_settings)  # unknown keys, out-of-range values
    if cls.needs_cls_token:
        check_cls_token(name, config, tuple(m for m, c in METHODS.items() if not c.needs_cls_token))
    if config.use_deft and getattr(config, "deft_text_retention_ratio", None) is not None:
        if "text" not in cls.modalities:
            raise ValueError(
                f"deft_text_retention_ratio={config.deft_text_retention_ratio!r}: compression_method={name!r} "
                f"does not compress text; methods that do: {[m for m, c in METHODS.items() if 'text' in c.modalities]} "
                "(or leave deft_text_retention_ratio=None: the context is then kept whole)"
            )
    cls.check_config(config, settings, num_tokens, num_kept)


def validate_anyres_method(config) -> None:
    """Raise ValueError when `config.compression_method` cannot compress LLaVA-NeXT (AnyRes) images
    (`CompressionMethod.anyres_refusal`), naming why and the methods that run with these settings."""
    name = config.compression_method
    reason = method_class(name).anyres_refusal(config, method_settings(name, config.compression_settings))
    if reason is not None:
        runs = [
            other
            for other, c in METHODS.items()
            if other != name and c.anyres_refusal(config, method_settings(other, None)) is None
        ]
        raise ValueError(
            f"compression_method={name!r} cannot compress LLaVA-NeXT (AnyRes) images: "
            f"{reason}. Methods that run here with these settings: {runs}"
        )


__all__ = [
    "PlaceholderPolicyInputs",
    "placeholder_count",
    "validate_anyres_method",
    "validate_compression_method",
    "validate_method",
    "video_capable_methods",
    "video_placeholder_count",
]
