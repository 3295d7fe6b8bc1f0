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

A method that selects once the prompt is known (question-aware DeFT, CDPruner: `decides_on_prompt` and a
`compress_with_prompt` hook) gets each image's N rows and `AnyResLayout` from step 1 instead; once the prompt is
built, `_compress_items_with_prompt` runs steps 2 and 3 with, for each image, a prompt whose placeholders are that
image's alone (the method reads the question of that image's row). A method that marks the rows it keeps out of
all N (`rows_used`: DeFT `hybrid`/`adaptive`, CDPruner; the processor then writes N placeholders) gets its marks
merged per image, the kept row markers marked used; the model drops the other rows and re-packs the batch.

One method call per token set: a row of a batch is compressed exactly as it is alone, and images of different
sizes (a different N and K per image) share a batch. With compression off this model computes what
`LlavaNextForConditionalGeneration` computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextPreTrainedModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .compressors.compression_method import PromptBatch, VisualBatch
from .compressors.placeholder_policy import anyres_placeholder_count
from .configuration.anyres_settings import AnyResLayout
from .configuration.configuration_deft_llava_next import DeftLlavaNextConfig
from .configuration.deft_settings import num_kept_tokens
from .modeling_deft_llava import (
    DeftLlavaForConditionalGeneration,
    DeftLlavaModel,
    DeftLlavaPreTrainedModel,
)
from .modeling_outputs_deft_llava import DeftVisualFeaturesOutput


@dataclass
class DeftAnyResFeaturesOutput(DeftVisualFeaturesOutput):
    """`DeftVisualFeaturesOutput` of AnyRes images whose N rows wait for the prompt (a method that selects with
    it): `anyres_layouts` is the list, per image, of its `AnyResLayout` (a per-item field: beam search reorders
    it with the rows)."""

    anyres_layouts: list | None = None


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
        layouts = []
        for feature, size in zip(features, image_sizes):
            layout = self.anyres_layout(size.tolist() if isinstance(size, torch.Tensor) else list(size))
            if layout.num_tokens != feature.shape[0]:
                raise ValueError(
                    f"an image of size {size.tolist()} has {feature.shape[0]} packed tokens, but its AnyRes layout "
                    f"(base view {layout.base_shape}, tile grid {layout.grid_shape}) holds {layout.num_tokens}: "
                    "use vision_feature_select_strategy='default' with a tower that has a CLS token"
                )
            layouts.append(layout)
        if self._selects_with_prompt(method):
            # the N rows wait for the prompt (`_compress_items_with_prompt`), each image with its layout
            return DeftAnyResFeaturesOutput(
                **{f.name: getattr(result, f.name) for f in fields(result)}, anyres_layouts=layouts
            )
        merged = [self._compress_image(method, feature, layout) for feature, layout in zip(features, layouts)]
        return self._images_output(result, merged)

    @staticmethod
    def _selects_with_prompt(method) -> bool:
        """The method selects once the prompt is known (question-aware DeFT, CDPruner): AnyRes images wait."""
        return method.acts_in("compress_with_prompt") and bool(getattr(method, "decides_on_prompt", False))

    def placeholders_per_item(self, features) -> list[int]:
        """Placeholders each image fills: its layout's count while its N rows wait for the prompt."""
        layouts = getattr(features, "anyres_layouts", None)
        if layouts is None:
            return [len(rows) for rows in features.pooler_output]
        return [anyres_placeholder_count(layout, self.config) for layout in layouts]

    def _compress_items_with_prompt(self, method, features, prompt: PromptBatch):
        """Each token set of each image through the method's `compress_features`, then its
        `compress_with_prompt` with a prompt whose placeholders are that image's alone (the method reads the
        question of that image's row). Features already compressed (`anyres_layouts` None) pass unchanged.

        Raises:
            ValueError: the prompt's placeholders are not as many as the images' layouts need.
        """
        layouts = getattr(features, "anyres_layouts", None)
        if layouts is None:
            return features
        counts = self.placeholders_per_item(features)
        where = prompt.placeholder_mask.nonzero()  # (placeholders, 2), row-major
        if where.shape[0] != sum(counts):
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {where.shape[0]}, features: {sum(counts)}; "
                f"the text has {where.shape[0]} <image> placeholders but the {len(counts)} image(s) need {counts} "
                "(their AnyRes layouts); build inputs with DeftLlavaNextProcessor for this model's config"
            )
        merged, start = [], 0
        for feature, layout, count in zip(features.pooler_output, layouts, counts):
            own = torch.zeros_like(prompt.placeholder_mask)
            own[where[start : start + count, 0], where[start : start + count, 1]] = True
            start += count
            image_prompt = replace(prompt, placeholder_mask=own)

            def compress(item, visual, image_prompt=image_prompt):
                item = method.compress_features(item, visual)
                return method.compress_with_prompt(item, replace(image_prompt, num_kept=visual.num_kept))

            merged.append(self._compress_image(method, feature, layout, compress))
        return self._images_output(features, merged)

    def _compress_image(self, method, feature: torch.Tensor, layout: AnyResLayout, compress=None) -> dict:
        """One image: each token set of `layout.token_sets` through `compress(item, visual)` (one item, its own
        budget K and layout; default: the method's `compress_features`), merged with the tokens kept without ranking in the stock packed order.

        Returns a dict of the image's `rows` `(rows, D)`, `sources` `(rows,)` packed indices, `rows_used` and
        `rows_selected` `(rows,)` bool or None (a method that marks the rows it keeps out of all N: then `rows`
        holds all N, the kept newlines used), `scores` `(N,)` float (the method's scores; +inf on the tokens
        kept without ranking, NaN where the method gave none), and the method's `mixture_weights`,
        `num_reconstructed`, `rtd_loss`."""
        if compress is None:

            def compress(item, visual):
                return method.compress_features(item, visual)

        sets, always = layout.token_sets(self.config.anyres_budget, self.config.anyres_image_newline)
        device, n_all = feature.device, feature.shape[0]
        scores = torch.full((n_all,), float("nan"), device=device)
        scores[always] = float("inf")
        outputs = []
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
                feature_layer=self.config.vision_feature_layer,
                vision_tower=self.vision_tower,
                projector=self.multi_modal_projector,
                input_embeddings=self.get_input_embeddings(),
            )
            item = DeftVisualFeaturesOutput(
                pooler_output=[feature[index]],
                source_indices=[torch.arange(n, device=device)],
                num_source_tokens=[n],
            )
            out = compress(item, visual)
            if out.compression_scores is not None:
                scores[index] = out.compression_scores[0].to(device, torch.float32)
            outputs.append((index, out))
        image = {"scores": scores, "rows_used": None, "rows_selected": None}
        first = outputs[0][1]
        image["mixture_weights"] = first.mixture_weights
        rebuilt = [o.num_reconstructed.sum() for _, o in outputs if o.num_reconstructed is not None]
        image["num_reconstructed"] = torch.stack(rebuilt).sum() if rebuilt else None
        losses = [o.rtd_loss for _, o in outputs if o.rtd_loss is not None]
        image["rtd_loss"] = torch.stack(losses).mean() if losses else None
        if all(o.rows_used is None for _, o in outputs):
            pieces = (
                [(feature[always], torch.tensor(always, dtype=torch.long, device=device))] if always else []
            )
            pieces += [(o.pooler_output[0], index[o.source_indices[0].to(device)]) for index, o in outputs]
            kept = torch.cat([s for _, s in pieces])
            order = kept.argsort()
            image["rows"] = torch.cat([r for r, _ in pieces])[order]
            image["sources"] = kept[order]
            return image
        # the method marked the rows it keeps out of all N (content-dependent counts): N rows in the stock order
        rows = feature.clone()
        used = torch.ones(n_all, dtype=torch.bool, device=device)
        selected = used.clone()
        for index, o in outputs:
            if o.rows_used is None or len(o.pooler_output[0]) != len(index):
                raise ValueError(
                    f"compression_method={self.config.compression_method!r} returned rows of a set of {len(index)} "
                    "tokens that neither keep K rows nor mark all N (rows_used): it cannot compress AnyRes images"
                )
            rows[index] = o.pooler_output[0].to(rows.dtype)
            used[index] = o.rows_used[0].to(device)
            chosen = o.rows_selected if o.rows_selected is not None else o.rows_used
            selected[index] = chosen[0].to(device)
        image.update(
            rows=rows, sources=torch.arange(n_all, device=device), rows_used=used, rows_selected=selected
        )
        return image

    @staticmethod
    def _images_output(result, merged: list[dict]) -> DeftVisualFeaturesOutput:
        """`result` (the stock features) with each image's merged rows (`_compress_image`); `compression_scores`
        `(images, max N)`, padded with NaN past an image's N."""
        width = max(m["scores"].shape[0] for m in merged)
        scores = torch.stack(
            [
                torch.nn.functional.pad(m["scores"], (0, width - m["scores"].shape[0]), value=float("nan"))
                for m in merged
            ]
        )
        marks = any(m["rows_used"] is not None for m in merged)
        rebuilt = [m["num_reconstructed"] for m in merged]
        losses = [m["rtd_loss"] for m in merged if m["rtd_loss"] is not None]
        return DeftVisualFeaturesOutput(
            last_hidden_state=result.last_hidden_state,
            hidden_states=result.hidden_states,
            attentions=result.attentions,
            pooler_output=[m["rows"] for m in merged],
            source_indices=[m["sources"] for m in merged],
            num_source_tokens=list(result.num_source_tokens),
            rows_used=[m["rows_used"] for m in merged] if marks else None,
            rows_selected=[m["rows_selected"] for m in merged] if marks else None,
            compression_scores=scores,
            mixture_weights=merged[0]["mixture_weights"],
            num_reconstructed=None if None in rebuilt else torch.stack(rebuilt),
            rtd_loss=torch.stack(losses).mean() if losses else None,
        )

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
