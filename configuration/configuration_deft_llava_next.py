"""`DeftLlavaNextConfig`: `LlavaNextConfig` plus the DeFT settings of `DeftLlavaConfig` and the AnyRes settings
(defaults from `deft_settings.DeftSettings` and `anyres_settings.AnyResSettings`)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaNextConfig

from ..compressors.placeholder_policy import validate_anyres_method
from .anyres_settings import ANYRES_DEFAULTS, validate_anyres_settings
from .configuration_deft_llava import DeftLlavaConfig


@strict
class DeftLlavaNextConfig(DeftLlavaConfig, LlavaNextConfig):
    r"""Configuration of `DeftLlavaNextForConditionalGeneration` (LLaVA-NeXT, "AnyRes" images).

    Every field of `LlavaNextConfig` (`image_grid_pinpoints` included), every DeFT setting of `DeftLlavaConfig`
    (same names, same defaults), plus (see `anyres_settings.py`):

    anyres_budget (`str`, defaults to `"image"`): `"image"`: `deft_retention_ratio` applies to each image's
        whole visual set (base view + unpadded tile grid), one ranking; `"view"`: each view its own budget.
    anyres_image_newline (`str`, defaults to `"keep"`): `"keep"`: the `image_newline` row markers are all kept,
        outside the budget; `"compress"`: they are ranked and counted like any token.

    Compression methods: those whose `anyres_refusal` is None (DeFT in every mode, question-aware or not;
    random, uniform, divprune, cdpruner); the others are refused when the config is built, with the reason.

    Example:

    ```python
    >>> from modeling_deft_llava import DeftLlavaNextConfig
    >>> config = DeftLlavaNextConfig(use_deft=True, deft_retention_ratio=0.25, deft_question_aware=True)
    >>> config.model_type, config.anyres_budget, config.anyres_image_newline
    ('deft_llava_next', 'image', 'keep')
    ```
    """

    model_type = "deft_llava_next"
    stock_model_type = "llava_next"
    attribute_map = {"image_token_id": "image_token_index"}

    anyres_budget: str = ANYRES_DEFAULTS.anyres_budget
    anyres_image_newline: str = ANYRES_DEFAULTS.anyres_image_newline

    def validate_deft(self) -> None:
        """`DeftLlavaConfig`'s checks, the AnyRes settings, and whether the method compresses AnyRes images.

        Raises:
            ValueError: names the bad value, or the method and why it cannot run on AnyRes images.
        """
        super().validate_deft()
        validate_anyres_settings(self.anyres_budget, self.anyres_image_newline)
        if self.video_token_index is not None:
            raise ValueError(
                f"video_token_index={self.video_token_index!r}: LLaVA-NeXT takes images only (video is "
                "LLaVA-NeXT-Video / OneVision); leave it None"
            )
        if not self.use_deft:
            return
        validate_anyres_method(self)


__all__ = ["DeftLlavaNextConfig"]
