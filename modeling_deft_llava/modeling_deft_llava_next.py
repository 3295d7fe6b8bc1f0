"""DeFT-LLaVA-NeXT: `LlavaNextForConditionalGeneration` with token compression inside the forward pass.

The same pipeline as `DeftLlavaForConditionalGeneration` (`modeling_deft_llava.py`: the method's hooks, the
`TokenLayout`, positions and cache state), written once there; this file holds only what AnyRes changes, the
encoding step (`get_image_features`):

1. the stock LLaVA-NeXT encoder runs unchanged (`LlavaNextModel.get_image_features`: every view through the
   vision tower and the projector, the tile grid unpadded, the `image_newline` row markers inserted), giving
   each image's N packed tokens in the stock order;
2. each image's tokens are split as `AnyResLayout.token_sets` says (`anyres_budget`, `anyres_image_newline`:
   `configuration/anyres_settings.py`) and the method's `compress_features` runs on each set alone, with its
   own budget K and its layout (`VisualBatch.spatial_shape`: the views for a method that takes "views", so
   DeFT's group score uses the true 2-D neighbours inside the base view and inside the tile grid; a `(1, N)`
   sequence for a method that never reads neighbours; one grid per view with `anyres_budget="view"`);
3. the kept rows (and the newlines kept as row markers) go back in the stock order, each with its packed index
   as its source, so kept tokens keep their original positions and the text after an image continues at
   `start + N`, whatever was dropped.

One method call per token set: a row of a batch is compressed exactly as it is alone, and images of different
sizes (a different N and K per image) share a batch. With compression off this model computes what
`LlavaNextForConditionalGeneration` computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextPreTrainedModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .compressors.compression_method import VisualBatch
from .configuration.anyres_settings import AnyResLayout
from .configuration.configuration_deft_llava_next import DeftLlavaNextConfig
from .configuration.deft_settings import num_kept_tokens
from .modeling_deft_llava import (
    DeftLlavaForConditionalGeneration,
    DeftLlavaModel,
    DeftLlavaPreTrainedModel,
)
from .modeling_outputs_deft_llava import DeftVisualFeaturesOutput


class DeftLlavaNextPreTrainedModel(DeftLlavaPreTrainedModel, LlavaNextPreTrainedModel):
    config: DeftLlavaNextConfig
    config_class = DeftLlavaNextConfig
    input_modalities = ("image", "text")  # LLaVA-NeXT takes no video


class DeftLlavaNextModel(DeftLlavaNextPreTrainedModel, DeftLlavaModel, LlavaNextModel):
    """`LlavaNextModel` whose AnyRes visual features are compressed and whose position ids keep the original
    layout (see the module docstring)."""

    pixel_values_layout = "(num_images, num_patches, channels, height, width)"

    def post_init(self):
        # `DeftLlavaModel.__init__` builds the tower, projector (the same layers as LLaVA-NeXT's), language model
        # and method; LLaVA-NeXT adds the row marker, which must exist before the weights are initialised
        if "image_newline" not in self._parameters:
            hidden = self.config.text_config.hidden_size
            self.image_newline = nn.Parameter(torch.randn(hidden, dtype=self.dtype) / math.sqrt(hidden))
            self.vocab_size = self.config.text_config.vocab_size
        super().post_init()

    def anyres_layout(self, image_size) -> AnyResLayout:
        """Where the tokens of an image of `image_size` `(height, width)` sit in the stock packed order (the
        stock encoder's own grid and unpadding functions)."""
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        views = image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, vision.image_size)
        if views <= 1:
            return AnyResLayout((side, side), None)
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, vision.image_size
        )
        grid = unpad_image(torch.empty(0, tiles_high * side, tiles_wide * side), image_size)
        return AnyResLayout((side, side), tuple(grid.shape[1:]))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        token_gradients: list | None = None,
        **kwargs,
    ) -> DeftVisualFeaturesOutput:
        """Stock LLaVA-NeXT encoding -> the compression method on each image's token sets. Returns, per image,
        the rows for its placeholders (`source_indices`: their indices in the stock packed order).

        `pixel_values`: `(num_images, views, channels, height, width)` as the processor pads them (or the 4-D
        concatenation of every image's views); `image_sizes`: `(num_images, 2)` original `(height, width)`.

        Raises:
            ValueError: `image_sizes` missing; `token_gradients` given (DeFT's feedback training is not wired
                for AnyRes); the stock features do not have the length the layout computes.
        """
        kwargs.pop("return_dict", None)  # always a DeftVisualFeaturesOutput
        self._apply_config()
        if image_sizes is None:
            raise ValueError(
                "LLaVA-NeXT needs image_sizes ((num_images, 2) original height and width, as the processor "
                "returns it) to unpad each image's tile grid"
            )
        outputs = LlavaNextModel.get_image_features(
            self,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **kwargs,
        )
        features = list(outputs.pooler_output)
        result = DeftVisualFeaturesOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pooler_output=features,
            source_indices=[torch.arange(f.shape[0], device=f.device) for f in features],
            num_source_tokens=[f.shape[0] for f in features],
        )
        method = self.active_method
        if method is None or not features:
            return result
        if token_gradients is not None:
            raise ValueError(
                "deft_token_gradients (DeFT's feedback training) are not supported for LLaVA-NeXT images yet"
            )
        rows, sources = [], []
        for feature, size in zip(features, image_sizes):
            layout = self.anyres_layout(size.tolist() if isinstance(size, torch.Tensor) else list(size))
            if layout.num_tokens != feature.shape[0]:
                raise ValueError(
                    f"an image of size {size.tolist()} has {feature.shape[0]} packed tokens, but its AnyRes layout "
                    f"(base view {layout.base_shape}, tile grid {layout.grid_shape}) holds {layout.num_tokens}: "
                    "use vision_feature_select_strategy='default' with a tower that has a CLS token"
                )
            kept_rows, kept_sources = self._compress_image(method, feature, layout)
            rows.append(kept_rows)
            sources.append(kept_sources)
        result.pooler_output = rows
        result.source_indices = sources
        return result

    def _compress_image(self, method, feature: torch.Tensor, layout: AnyResLayout):
        """`(K, D)` rows and `(K,)` packed indices of one image: each token set through the method, plus the
        tokens kept without ranking, in the stock order."""
        sets, always = layout.token_sets(self.config.anyres_budget, self.config.anyres_image_newline)
        device = feature.device
        pieces = [(feature[always], torch.tensor(always, dtype=torch.long, device=device))] if always else []
        for indices, views in sets:
            index = torch.tensor(indices, dtype=torch.long, device=device)
            n = len(indices)
            if len(views) == 1:
                shape = views[0]  # one grid
            elif "views" in method.token_layouts:
                shape = views
            else:
                shape = (1, n)  # a sequence: the method never reads neighbours
            visual = VisualBatch(
                modality="image",
                spatial_shape=shape,
                frames=1,
                num_kept=num_kept_tokens(n, self.config.deft_retention_ratio),
            )
            item = DeftVisualFeaturesOutput(
                pooler_output=[feature[index]],
                source_indices=[torch.arange(n, device=device)],
                num_source_tokens=[n],
            )
            out = method.compress_features(item, visual)
            pieces.append((out.pooler_output[0], index[out.source_indices[0].to(device)]))
        kept = torch.cat([s for _, s in pieces])
        order = kept.argsort()
        return torch.cat([r for r, _ in pieces])[order], kept[order]

    def get_video_features(self, pixel_values_videos, *args, **kwargs):
        raise ValueError(
            "LLaVA-NeXT takes images only (pixel_values_videos given); videos are LLaVA-NeXT-Video / OneVision"
        )


class DeftLlavaNextForConditionalGeneration(
    DeftLlavaNextPreTrainedModel, DeftLlavaForConditionalGeneration, LlavaNextForConditionalGeneration
):
    """LLaVA-NeXT with compression in its forward pass, for `generate`, `pipeline` and `Trainer`.

    With `use_deft=False` it computes exactly what `LlavaNextForConditionalGeneration` computes. Reads stock
    llava-hf `llava_next` folders (either key layout, `DeftLlavaForConditionalGeneration.from_pretrained`).
    """

    LEGACY_KEY_MAPPING = {
        **DeftLlavaForConditionalGeneration.LEGACY_KEY_MAPPING,
        r"^image_newline": "model.image_newline",
    }

    def __init__(self, config: DeftLlavaNextConfig):
        DeftLlavaNextPreTrainedModel.__init__(self, config)
        self.model = DeftLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values, image_sizes=None, **kwargs):
        return self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)


__all__ = [
    "DeftLlavaNextForConditionalGeneration",
    "DeftLlavaNextModel",
    "DeftLlavaNextPreTrainedModel",
]
