"""`DeftLlavaNextProcessor`: `LlavaNextProcessor` that writes as many placeholders as DeFT-LLaVA-NeXT keeps."""

from __future__ import annotations

from transformers import LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution

from ..compressors.placeholder_policy import anyres_placeholder_count, validate_compression_method
from ..configuration.anyres_settings import ANYRES_DEFAULTS, AnyResLayout, validate_anyres_settings
from ..configuration.configuration_deft_llava import DEFT_CONFIG_KEYS
from ..configuration.deft_settings import DEFAULTS, check_unknown_deft_keys, validate_deft_settings
from ..configuration.supported_versions import check_transformers_version
from .image_depth import images_to_eight_bit
from .processing_deft_llava import check_image_arrays

check_transformers_version()

# the keys a processor needs (same names and defaults as `DeftLlavaNextConfig`)
PROCESSOR_KEYS = (
    "use_deft",
    "deft_retention_ratio",
    "deft_inference_mode",
    "compression_method",
    "compression_settings",
    "anyres_budget",
    "anyres_image_newline",
)


class DeftLlavaNextProcessor(LlavaNextProcessor):
    r"""LLaVA-NeXT processor for DeFT-LLaVA-NeXT: each image gets its own count of `<image>` placeholders,
    `AnyResLayout.placeholders` of its base view and unpadded tile grid (the model's count): K per token set
    plus the kept row markers, or the stock count N without compression and for a method that writes every
    placeholder (DeFT `hybrid`/`adaptive`, CDPruner).

    Args (beyond `LlavaNextProcessor`): use_deft, deft_retention_ratio, deft_inference_mode, compression_method,
        compression_settings, anyres_budget, anyres_image_newline: as in `DeftLlavaNextConfig`.

    The full signature is repeated on purpose: `ProcessorMixin.to_dict` saves only named `__init__` arguments.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        use_deft: bool = DEFAULTS.use_deft,
        deft_retention_ratio: float = DEFAULTS.deft_retention_ratio,
        deft_inference_mode: str = DEFAULTS.deft_inference_mode,
        compression_method: str = "deft",
        compression_settings: dict | None = None,
        anyres_budget: str = ANYRES_DEFAULTS.anyres_budget,
        anyres_image_newline: str = ANYRES_DEFAULTS.anyres_image_newline,
        **kwargs,
    ):
        validate_deft_settings(
            use_deft=use_deft,
            deft_retention_ratio=deft_retention_ratio,
            deft_inference_mode=deft_inference_mode,
        )
        validate_compression_method(compression_method)
        validate_anyres_settings(anyres_budget, anyres_image_newline)
        check_unknown_deft_keys(kwargs, DEFT_CONFIG_KEYS, type(self).__name__)
        for key in DEFT_CONFIG_KEYS:
            kwargs.pop(key, None)  # model-only settings do not change placeholders
        self.use_deft = use_deft
        self.deft_retention_ratio = deft_retention_ratio
        self.deft_inference_mode = deft_inference_mode
        self.compression_method = compression_method
        self.compression_settings = compression_settings
        self.anyres_budget = anyres_budget
        self.anyres_image_newline = anyres_image_newline
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Like `LlavaNextProcessor.from_pretrained`; the keys of `PROCESSOR_KEYS` given here override the saved
        ones (a processor for a converted model from a stock llava-hf folder)."""
        overrides = {key: kwargs.pop(key) for key in PROCESSOR_KEYS if key in kwargs}
        check_unknown_deft_keys(kwargs, DEFT_CONFIG_KEYS, f"{cls.__name__}.from_pretrained")
        for key in DEFT_CONFIG_KEYS:
            kwargs.pop(key, None)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for key, value in overrides.items():
            setattr(processor, key, value)
        validate_deft_settings(
            use_deft=processor.use_deft,
            deft_retention_ratio=processor.deft_retention_ratio,
            deft_inference_mode=processor.deft_inference_mode,
        )
        validate_compression_method(processor.compression_method)
        validate_anyres_settings(processor.anyres_budget, processor.anyres_image_newline)
        return processor

    def anyres_layout(self, orig_height: int, orig_width: int, height: int, width: int) -> AnyResLayout:
        """The layout of an image of `orig_height x orig_width` whose views are `height x width` pixels
        (the stock processor's own grid and unpadding arithmetic)."""
        best_height, best_width = select_best_resolution(
            [orig_height, orig_width], self.image_processor.image_grid_pinpoints
        )
        rows, cols = height // self.patch_size, width // self.patch_size
        unpadded, newlines = self._get_unpadded_features(
            orig_height, orig_width, rows, cols, best_height // height, best_width // width
        )
        return AnyResLayout((rows, cols), (newlines, unpadded // newlines))

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """As `LlavaNextProcessor.__call__`, with `DeftLlavaProcessor`'s input handling: 16-bit images are
        scaled to 8 bits (`image_depth.py`), not clipped by the RGB conversion.

        Raises:
            ValueError: videos (LLaVA-NeXT takes images only), images without text, an image array of a
                rank other than 3 or 4.
        """
        if videos is not None:
            raise ValueError(
                "videos were given: LLaVA-NeXT takes images only (videos are LLaVA-NeXT-Video / OneVision)"
            )
        if images is not None and text is None:
            raise ValueError(
                f"images were given with text=None: the model needs a prompt with one {self.image_token!r} "
                f"placeholder per image (processor(images=..., text='[INST] {self.image_token}\\n... [/INST]')); "
                "for the pixel values alone use processor.image_processor(images, return_tensors='pt')"
            )
        check_image_arrays(images)
        images = images_to_eight_bit(images) if images is not None else None
        return super().__call__(images=images, text=text, audio=audio, **kwargs)

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Placeholders of one image (the stock count, plus `num_additional_image_tokens`, which the stock
        processor takes off again for the "default" strategy)."""
        layout = self.anyres_layout(orig_height, orig_width, height, width)
        return anyres_placeholder_count(layout, self) + self.num_additional_image_tokens


__all__ = ["DeftLlavaNextProcessor"]
