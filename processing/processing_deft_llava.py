"""`DeftLlavaProcessor`: `LlavaProcessor` that writes as many placeholders as the DeFT model produces."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaProcessor
from transformers.image_utils import get_image_size, to_numpy_array

from ..compressors.placeholder_policy import (
    placeholder_count,
    validate_compression_method,
    video_placeholder_count,
)
from ..configuration.configuration_deft_llava import DEFT_CONFIG_KEYS
from ..configuration.deft_settings import DEFAULTS, check_unknown_deft_keys, validate_deft_settings
from ..configuration.supported_versions import check_transformers_version
from .image_depth import images_to_eight_bit

check_transformers_version()  # a clear ImportError outside the tested range (also in a Hub folder)

# the DeFT keys a processor needs (same names and defaults as the config)
PROCESSOR_DEFT_KEYS = (
    "use_deft",
    "deft_retention_ratio",
    "deft_inference_mode",
    "compression_method",
    "compression_settings",
)


def placeholder_id(tokenizer, token: str | None) -> int | None:
    """Id of the placeholder `token` in the tokenizer's vocabulary, or None when it has no such token (then
    `convert_tokens_to_ids` gives the `<unk>` id, and counting that id would count unknown words)."""
    if tokenizer is None or not token:
        return None
    return tokenizer.get_vocab().get(token)


def check_image_arrays(images, name: str = "images") -> None:
    """Arrays and tensors among `images` (an image, or a nested list of them) must be pictures: 3-D (height,
    width, channels) or (channels, height, width), or 4-D (a batch of them).

    Raises:
        ValueError: an array of another rank (a 2-D grey array names its shape and the fix).
    """
    if isinstance(images, (list, tuple)):
        for i, item in enumerate(images):
            check_image_arrays(item, f"{name}[{i}]")
        return
    if not isinstance(images, (np.ndarray, torch.Tensor)) or images.ndim in (3, 4):
        return
    hint = (
        ": a grey picture needs a channel axis (array[..., None], shape (height, width, 1)) or a PIL image "
        "(PIL.Image.fromarray(array))"
        if images.ndim == 2
        else ""
    )
    raise ValueError(
        f"{name} is an array of shape {tuple(images.shape)}; an image array must have 3 dimensions, (height, "
        f"width, channels) or (channels, height, width) with 1, 3 or 4 channels, or 4 for a batch of images{hint}"
    )


class DeftLlavaProcessor(LlavaProcessor):
    r"""LLaVA processor for DeFT-LLaVA.

    Writes `placeholder_count(N, ...)` `<image>` tokens per image (N = patches of the processed image): K kept
    tokens for fixed budgets, N for the RTD `hybrid`/`adaptive` modes where the model drops tokens itself.
    Videos (a list of frames per video) get `frames * patches` encoder tokens behind one `<video>`.

    Args (beyond `LlavaProcessor`):
        video_token: the video placeholder (default `<video>`). Video is supported only when the tokenizer
            has this token: the public llava-hf tokenizers have no `<video>`, and without one the processor
            takes no videos (`video_token` and `video_token_id` are then None). The image token is required.
        context_start_token, context_end_token: the markers around a long text context (default `<context>`
            and `</context>`; the model's `context_start_token_index`/`context_end_token_index`). Used only when
            the tokenizer has both; then `apply_chat_template` turns a content item
            `{"type": "context", "text": ...}` into that text between the markers, whatever the chat template
            (a template that knows only text items renders it). Without them a context item is a ValueError.
        use_deft, deft_retention_ratio, deft_inference_mode, compression_method, compression_settings: as in
            `DeftLlavaConfig` (a method's settings may decide its placeholder count: PruneSID `dynamic_budget`).

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
        video_token="<video>",
        context_start_token="<context>",
        context_end_token="</context>",
        use_deft: bool = DEFAULTS.use_deft,
        deft_retention_ratio: float = DEFAULTS.deft_retention_ratio,
        deft_inference_mode: str = DEFAULTS.deft_inference_mode,
        compression_method: str = "deft",
        compression_settings: dict | None = None,
        **kwargs,
    ):
        validate_deft_settings(
            use_deft=use_deft,
            deft_retention_ratio=deft_retention_ratio,
            deft_inference_mode=deft_inference_mode,
        )
        validate_compression_method(compression_method)  # at construction, naming the valid methods
        # a misspelt DeFT key (`deft_retension_ratio`) would otherwise vanish into **kwargs; model-only settings
        # (the same dict is often given to the model and the processor) do not change placeholders: dropped
        check_unknown_deft_keys(kwargs, DEFT_CONFIG_KEYS, type(self).__name__)
        for key in DEFT_CONFIG_KEYS:
            kwargs.pop(key, None)
        self.use_deft = use_deft
        self.deft_retention_ratio = deft_retention_ratio
        self.deft_inference_mode = deft_inference_mode
        self.compression_method = compression_method
        self.compression_settings = compression_settings
        video_token = tokenizer.video_token if hasattr(tokenizer, "video_token") else video_token
        self.video_token_id = placeholder_id(tokenizer, video_token)
        self.video_token = video_token if self.video_token_id is not None else None
        has_markers = all(
            placeholder_id(tokenizer, t) is not None for t in (context_start_token, context_end_token)
        )
        self.context_start_token = context_start_token if has_markers else None
        self.context_end_token = context_end_token if has_markers else None
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
        if self.tokenizer is not None and placeholder_id(self.tokenizer, self.image_token) is None:
            # LlavaProcessor would take the id of the token's first piece (often <unk>) as the image placeholder
            raise ValueError(
                f"the tokenizer has no {self.image_token!r} token (it would be split into "
                f"{self.tokenizer.tokenize(self.image_token)}), so images cannot be placed; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{self.image_token!r}]}}) and set "
                "the model's config.image_token_index to its id, or pass image_token= a token the tokenizer has"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Like `LlavaProcessor.from_pretrained`; DeFT keys given here override the saved ones, so a processor
        for a converted model can be built from a stock llava-hf folder."""
        overrides = {key: kwargs.pop(key) for key in PROCESSOR_DEFT_KEYS if key in kwargs}
        check_unknown_deft_keys(kwargs, DEFT_CONFIG_KEYS, f"{cls.__name__}.from_pretrained")
        for key in DEFT_CONFIG_KEYS:
            kwargs.pop(key, None)  # model-only settings: they do not change placeholders
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if overrides:
            validate_deft_settings(
                **{
                    k: v
                    for k, v in overrides.items()
                    if k not in ("compression_method", "compression_settings")
                }
            )
            if "compression_method" in overrides:
                validate_compression_method(overrides["compression_method"])
            for key, value in overrides.items():
                setattr(processor, key, value)
        return processor

    # ------------------------------------------------------------------ text context
    def apply_chat_template(self, conversation, *args, **kwargs):
        """`ProcessorMixin.apply_chat_template`, plus the content type `{"type": "context", "text": ...}`: a long
        text context (documents, a transcript, many-shot examples) that the model may compress
        (`deft_text_retention_ratio`); it becomes a text item wrapped in the context markers."""
        return super().apply_chat_template(self.context_items_as_text(conversation), *args, **kwargs)

    def context_items_as_text(self, conversation):
        """A copy of `conversation` (one, or a batch of them) whose context items are marked text items.

        Raises:
            ValueError: a context item without a str `text`, or a tokenizer without the markers.
        """
        if isinstance(conversation, (list, tuple)):
            return [self.context_items_as_text(item) for item in conversation]
        if not isinstance(conversation, dict):
            return conversation
        if conversation.get("type") == "context":
            text = conversation.get("text")
            if not isinstance(text, str):
                raise ValueError(f"a context item needs a str 'text', got {conversation!r}")
            if self.context_start_token is None:
                raise ValueError(
                    "a {'type': 'context'} item needs context markers in the tokenizer, and it has no "
                    "'<context>'/'</context>' tokens; add them (tokenizer.add_special_tokens) and set the model's "
                    "context_start_token_index/context_end_token_index to their ids, or send the context as text"
                )
            return {"type": "text", "text": self.context_start_token + text + self.context_end_token}
        if isinstance(conversation.get("content"), (list, tuple)):
            return {**conversation, "content": self.context_items_as_text(conversation["content"])}
        return conversation

    # ------------------------------------------------------------------ counts
    def num_encoder_tokens(self, height: int, width: int) -> int:
        """Tokens the vision tower gives for one image of this size (before compression)."""
        num = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            num -= 1
        return num

    def num_placeholders(self, num_encoder_tokens: int) -> int:
        return placeholder_count(
            num_encoder_tokens,
            self.use_deft,
            self.deft_retention_ratio,
            self.deft_inference_mode,
            self.compression_method,
            self.compression_settings,
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        pixel_values = image_inputs["pixel_values"][image_idx]
        height, width = get_image_size(to_numpy_array(pixel_values))
        return self.image_token * self.num_placeholders(self.num_encoder_tokens(height, width))

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [self.num_placeholders(n) for n in data.num_image_tokens]
        return data

    # ------------------------------------------------------------------ videos
    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Videos are checked in `__call__` (frames go through the image processor); validate the rest."""
        if text is not None and self.video_token is not None:
            text = [t.replace(self.video_token, "") for t in ([text] if isinstance(text, str) else text)]
        return super().validate_inputs(images=images, text=text, videos=None, audio=audio, **kwargs)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """As `LlavaProcessor.__call__`, plus `videos`: a list of videos, each a list of frames (PIL images or
        arrays); returns `pixel_values_videos` `(num_videos, frames, channels, height, width)`. 16-bit images and
        frames are scaled to 8 bits first (`image_depth.py`), not clipped by the RGB conversion."""
        if images is not None and text is None:
            raise ValueError(
                f"images were given with text=None: the model needs a prompt with one {self.image_token!r} "
                f"placeholder per image (processor(images=..., text='USER: {self.image_token}\\n...')); for the "
                "pixel values alone use processor.image_processor(images, return_tensors='pt')"
            )
        check_image_arrays(images)
        check_image_arrays(videos, "videos")
        images = images_to_eight_bit(images) if images is not None else None
        videos = images_to_eight_bit(videos) if videos is not None else None
        texts = None if text is None else [text] if isinstance(text, str) else list(text)
        n_placeholders = sum(t.count(self.video_token) for t in texts) if texts and self.video_token else 0
        # the video checks word their errors as ProcessorMixin.validate_inputs does for images (tools match on it)
        if videos is None:
            if n_placeholders:
                raise ValueError(
                    f"Found {n_placeholders} {self.video_token} tokens in the text but no videos were passed."
                )
            return super().__call__(images=images, text=text, audio=audio, **kwargs)
        if self.video_token is None:
            raise ValueError(
                "videos are not supported: this processor's tokenizer has no video placeholder token (such as "
                "'<video>'; the public llava-hf tokenizers have none), so video_token is None; pass images, or add "
                "the token to the tokenizer and set the model's config.video_token_index"
            )
        if texts is None:
            raise ValueError("videos need a text prompt with one <video> placeholder per video")
        if n_placeholders != len(videos):
            raise ValueError(
                f"The total number of {self.video_token} tokens in the prompts should be the same as the number of "
                f"videos passed. Found total {n_placeholders} {self.video_token} tokens and {len(videos)} videos."
            )
        frames_per_video = {len(v) for v in videos}
        if len(frames_per_video) != 1 or 0 in frames_per_video:
            raise ValueError(
                f"every video must have the same, non-zero number of frames, got {sorted(frames_per_video)}"
            )
        frames = [frame for video in videos for frame in video]
        pixel = self.image_processor(frames, return_tensors="pt")[
            "pixel_values"
        ]  # (videos * frames, C, H, W)
        pixel = pixel.view(len(videos), -1, *pixel.shape[1:])  # (videos, frames, C, H, W)
        per_frame = self.num_encoder_tokens(pixel.shape[-2], pixel.shape[-1])
        count = video_placeholder_count(
            per_frame,
            pixel.shape[1],
            self.use_deft,
            self.deft_retention_ratio,
            self.deft_inference_mode,
            self.compression_method,
            self.compression_settings,
        )
        texts = [t.replace(self.video_token, self.video_token * count) for t in texts]
        out = super().__call__(images=images, text=texts, audio=audio, **kwargs)
        return_tensors = kwargs.get("return_tensors")
        out["pixel_values_videos"] = pixel if return_tensors == "pt" else np.asarray(pixel)
        if return_tensors == "pt" and not isinstance(out["pixel_values_videos"], torch.Tensor):
            out["pixel_values_videos"] = torch.as_tensor(out["pixel_values_videos"])
        return out


__all__ = ["DeftLlavaProcessor"]
