"""Config-time validation of the compression method: its name, its settings and what it needs from the model.

Every check comes from the registry (`modeling_deft_llava/compressors/compression_registry.py`, imported
inside the function so that importing the config stays light): the method's `settings_class` checks its
values, its declarations say whether it reads the CLS token, and its `check_config` checks layer counts and
budgets.
"""

from __future__ import annotations

from .vision_towers import check_cls_token


def validate_method(config, num_tokens: int | None, num_kept: int | None) -> None:
    """Raise ValueError for an unknown method, invalid settings, or a config the method cannot run on.

    Args:
        config: the `DeftLlavaConfig` being built.
        num_tokens: N patch tokens per image (None when the vision config does not say).
        num_kept: placeholders per image under this config (None without compression).
    """
    from ..compressors.compression_registry import METHODS, method_class, method_settings

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
