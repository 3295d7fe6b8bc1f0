"""The one interface every compression method implements, DeFT included: declarations and hooks.

`DeftLlavaModel` builds the method `config.compression_method` names (`compression_registry.build_method`)
and calls its hooks at fixed points of the LLaVA forward pass; it never asks which method is active. Each
hook does nothing by default, so a method writes only the hooks where it acts:

1. `encode_images`: run the vision encoder itself (ToMe, FiCoCo-V merge inside the CLIP layers).
2. `compress_vision_features`: compress the vision features that enter the projector (VisionZip, DeCo with
   `feature_space="vision"`).
3. `compress_features`: compress the projected features of each image or video (DeFT, DivPrune, ...).
4. `compress_with_prompt`: compress once the prompt's text is known (Recoverable Compression).
5. `run_language_model`: run the decoder layers (FastV and FiCoCo-L prune or merge inside them).
6. `reconsider`: after the prefill, ask for a second prefill with more tokens (DeFT's `adaptive` mode).
7. `compress_text`: choose the context text tokens to keep (a method with `"text"` in `modalities`: DeFT);
   the model drops the others (`text_context.py`, `TokenLayout.mark_context`).

A hook gets what it uses in its record, never the model: the batch's K (`VisualBatch.num_kept`,
`PromptBatch.num_kept`, `LanguageModelCall.num_kept`: the model applies the one rounding rule, no method
recomputes it from `deft_retention_ratio`) and the layers or embeddings it reads (`VisualBatch.vision_tower`,
`projector`, `input_embeddings`; `LanguageModelCall.language_model`).

Declarations, read at config time through `placeholder_policy.py` (by the config classes and the processors) and
by the model:
`name`, `settings_class` (the method's `compression_settings`), `modalities`, the `needs_*` inputs and the
placeholder policy `writes_all_placeholders` (K per image, or all N when the method decides the count inside
the forward pass and the model drops the unused rows).

Imports: torch and the standard library; `..modeling_outputs_deft_llava` for the records hooks exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class NoSettings:
    """Settings of a parameter-free method: there are none."""


@dataclass
class VisualBatch:
    """What the model knows about the images (or videos) whose features a method compresses.

    Args:
        modality: `"image"` or `"video"`.
        spatial_shape: `(rows, cols)` patch grid of one image or frame; for a method that takes "views"
            (`token_layouts`), a tuple of `(rows, cols)` grids whose tokens follow one another in the item.
        frames: frames per item (1 for images); an item has `rows * cols * frames` tokens.
        num_kept: K, the tokens each item keeps (`config.deft_retention_ratio`, the project's one rounding rule).
        vision_layer: the vision encoder layer whose output is the feature layer, or None.
        layer_input: `(items, 1 + N, width)` that layer's input, captured when the method `needs_vision_layer`.
        encoder_outputs: the vision tower's output (`hidden_states` when the tower returned them), or None.
        token_gradients: list, per item, of `(N, hidden_size)` gradients of a full-token task loss (DeFT).
        feature_layer: `config.vision_feature_layer`, the hidden-states index of the features (Recoverable
            reads the CLS token of that layer), or None.
        vision_tower: the vision encoder (a method that runs it itself: ToMe, FiCoCo-V), or None.
        projector: the multi-modal projector (vision width -> hidden_size), or None.
        input_embeddings: the language model's input embedding table (DeFT `hybrid` reads each visual token
            through it), or None.
    """

    modality: str
    spatial_shape: tuple[int, int]
    frames: int
    num_kept: int
    vision_layer: nn.Module | None = None
    layer_input: torch.Tensor | None = None
    encoder_outputs: Any = None
    token_gradients: list | None = None
    feature_layer: int | list[int] | None = None
    vision_tower: nn.Module | None = None
    projector: nn.Module | None = None
    input_embeddings: nn.Module | None = None


@dataclass
class PromptBatch:
    """The prompt, for a method that compresses once the text is known (`compress_with_prompt`).

    Args:
        inputs_embeds: `(batch, seq, hidden_size)` the model's input embeddings (placeholders not yet filled).
        placeholder_mask: `(batch, seq)` bool, this modality's placeholders (the same number per item, items in
            row-major order).
        text_mask: `(batch, seq)` bool, real text tokens: not padding, not a placeholder, not a context marker,
            and not an answer token of a training batch (`labels` set: the model never reads the answer as the
            question).
        prompt_length: tokens of the prompt; later ones were generated.
        modality: `"image"` or `"video"`, the items of `placeholder_mask`.
        num_kept: K, the tokens each item keeps (the project's one rounding rule on its rows), or None where
            the caller does not say (a method that needs K then refuses the call).
        input_embeddings: the language model's input embedding table (DeFT `hybrid`), or None.
        projector: the multi-modal projector (Recoverable's released order projects its merged tokens), or None.
    """

    inputs_embeds: torch.Tensor
    placeholder_mask: torch.Tensor
    text_mask: torch.Tensor
    prompt_length: int
    modality: str = "image"
    num_kept: int | None = None
    input_embeddings: nn.Module | None = None
    projector: nn.Module | None = None

    def kept_per_item(self, method: str) -> int:
        """K; raises ValueError naming `method` when the batch does not carry it."""
        if self.num_kept is None:
            raise ValueError(f"{method} keeps K tokens per item and needs PromptBatch.num_kept, got None")
        return self.num_kept

    def questions(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's batch row `(items,)` and its question `(items, seq)` bool: every real text token of the
        item's row up to the prompt length, before or after the item (a chat template may put the question on
        either side of the image; `num_rows` placeholders per item, row-major). With several items in a row,
        each reads the whole row's text."""
        where = self.placeholder_mask.nonzero()  # (items * num_rows, 2): item j holds entries j*num_rows ...
        row = where[::num_rows, 0]  # (items,)
        columns = torch.arange(self.placeholder_mask.shape[1], device=row.device)  # (seq,)
        in_prompt = (columns < self.prompt_length).unsqueeze(0)  # (1, seq)
        return row, self.text_mask[row] & in_prompt


@dataclass
class TextBatch:
    """The context text tokens of a batch, for a method that compresses text (`compress_text`).

    Args:
        tokens: `(batch, n, hidden_size)` each sample's context token embeddings, in order, padded at the end.
        token_mask: `(batch, n)` bool, False on that padding (a sample without context has an all-False row).
        retention_ratio: `config.deft_text_retention_ratio`; a sample keeps
            `max(1, floor(ratio * its context tokens + 0.5))` of them (the project's one rounding rule).
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    retention_ratio: float


@dataclass
class TextSelection:
    """What `compress_text` returns.

    Args:
        kept: `(batch, n)` bool, the context tokens the language model sees (never a padding slot).
        tokens: `(batch, n, hidden_size)` the rows to place back (kept rows may carry a straight-through gate,
            exactly 1 in value), or None to leave the embeddings as they are.
        scores: `(batch, n)` the scores the method ranked by, or None.
    """

    kept: torch.Tensor
    tokens: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@dataclass
class LanguageModelCall:
    """The language model's inputs, for a method that runs the decoder layers itself (`run_language_model`).

    Args:
        inputs_embeds: `(batch, seq, hidden_size)`; position_ids: `(batch, seq)` or None.
        attention_mask: `(batch, past + seq)` 2-D padding mask or None.
        cache: the KV cache (a transformers `Cache`) or None.
        kwargs: the other keyword arguments of the forward (`use_cache`, `output_attentions`, ...).
        layout: the prefill's `TokenLayout` (where each item's visual tokens are), None in decoding steps.
        prompt_length: tokens of the prompt (decisions use the prompt only).
        generation_state: what the prefill recorded for later steps: the `deft_generation_state` record's
            entries, the method's own included (FastV's layer gather index), which the model passes on unread.
        language_model: the decoder (its layers, rotary embedding and final norm).
        num_kept: K, the visual tokens each image keeps, in a prefill with images; None otherwise.
        output_flags: the model config's `output_attentions` / `output_hidden_states` (a call's own kwargs
            take precedence).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cache: Any
    kwargs: dict
    layout: Any = None
    prompt_length: int | None = None
    generation_state: dict = field(default_factory=dict)
    language_model: nn.Module | None = None
    num_kept: int | None = None
    output_flags: dict = field(default_factory=dict)


class CompressionMethod:
    """Base of every compression method (mixed into an `nn.Module`): declarations plus hooks that do nothing.

    A method subclasses `TokenCompressor` (methods that map `(items, N, D)` features to K tokens) or this
    class directly (DeFT, which is also its own `nn.Module`), sets the declarations and overrides the hooks
    where it acts. `DeftLlavaModel` holds it as the child `module_name` (`"compressor"`; DeFT keeps the
    checkpoint name `"deft"`).
    """

    name: ClassVar[str] = ""
    settings_class: ClassVar[type] = NoSettings
    module_name: ClassVar[str] = "compressor"
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    # reads the vision tower's CLS token: refused at config time on a tower without one (`vision_towers.py`)
    needs_cls_token: ClassVar[bool] = False
    needs_cls_attention: ClassVar[bool] = False
    needs_vision_keys: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    # decides from the prompt (`deft_prompt_length`): later decoding steps and a full recompute must decide
    # on the same prompt, so the model records its length for `generate`
    decides_on_prompt: ClassVar[bool] = False
    # runs the decoder layers on the input layout (`run_language_model` reads `TokenLayout`'s placeholder masks):
    # the model cannot drop tokens before it, so a context (whose markers are dropped) is refused
    needs_input_layout: ClassVar[bool] = False
    # trains from task-loss gradients (`VisualBatch.token_gradients`): the trainer runs its full-token pass
    learns_from_feedback: ClassVar[bool] = False
    # how an item's tokens may be laid out (`VisualBatch.spatial_shape`): "grid" (one `(rows, cols)` patch grid),
    # "sequence" (any token set in order, given as a `(1, N)` grid: the method never reads 2-D neighbours) and
    # "views" (several grids, `spatial_shape` a tuple of `(rows, cols)` pairs whose tokens follow one another:
    # an AnyRes image's base view and tile grid). Every method takes "grid".
    token_layouts: ClassVar[tuple[str, ...]] = ("grid",)

    # ------------------------------------------------------------------ config time
    @classmethod
    def writes_all_placeholders(cls, config) -> bool:
        """Placeholder policy: True when the processor writes all N placeholders per item (the method keeps K
        of them inside the forward pass, or a content-dependent count); False for K per item. `config` has
        `deft_retention_ratio`, `deft_inference_mode` and `compression_settings` (a `DeftLlavaConfig` or the
        processor's `PlaceholderPolicyInputs`)."""
        return False

    @classmethod
    def compresses_frames(cls, config) -> bool:
        """True when a video is compressed frame by frame, each frame as an image: the method takes images but
        not videos (`"video"` not in `modalities`), acts on each image alone (no hook that needs the prompt,
        the decoder or a second prefill: `compress_with_prompt`, `run_language_model`, `reconsider`) and
        writes K placeholders (`writes_all_placeholders` False). A video of F frames of N patches then keeps
        `F * floor(ratio * N + 0.5)` tokens (`placeholder_policy.video_placeholder_count`); the
        model runs the image path on the frames (`DeftLlavaModel.get_video_features`)."""
        if "video" in cls.modalities or "image" not in cls.modalities:
            return False
        own = ("compress_with_prompt", "run_language_model", "reconsider")
        if any(getattr(cls, hook) is not getattr(CompressionMethod, hook) for hook in own):
            return False
        return not cls.writes_all_placeholders(config)

    @classmethod
    def anyres_refusal(cls, config, settings) -> str | None:
        """Why this method cannot compress AnyRes images (LLaVA-NeXT: a base view plus a tile grid per image,
        a different N per image), or None when it can. `config` is a `DeftLlavaNextConfig`, `settings` an
        instance of `settings_class`. The default reads the declarations; a method may refuse more."""
        if cls._overrides("encode_images"):
            return (
                "it runs inside the vision encoder on one image's patch sequence, and LLaVA-NeXT encodes every "
                "view on its own and packs the views only after the projector"
            )
        if cls.needs_cls_token or cls.needs_cls_attention or cls.needs_vision_keys:
            return (
                "it reads the CLS token (or the attention and keys) of one vision pass, and an AnyRes image is "
                "several passes (the base view and every tile), each with its own CLS"
            )
        if getattr(settings, "feature_space", "projected") == "vision":
            return (
                "with feature_space='vision' it compresses the vision features before the projector, and "
                "LLaVA-NeXT unpads and packs the views after it; use compression_settings={'feature_space': "
                "'projected'}"
            )
        if cls._overrides("run_language_model"):
            return (
                "it prunes inside the decoder layers (run_language_model), which reads every image's tokens as "
                "one count of rows per image, and AnyRes images each have their own"
            )
        if config.anyres_budget == "image" and not {"views", "sequence"} & set(cls.token_layouts):
            return (
                "it reads one (rows, cols) patch grid, and with anyres_budget='image' an image's tokens fill "
                "two (the base view and the tile grid); use anyres_budget='view' (each view its own grid and "
                "budget)"
            )
        return None

    @classmethod
    def _overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(CompressionMethod, hook)

    @classmethod
    def parse_settings(cls, settings: dict | None):
        """An instance of `settings_class` from plain `compression_settings` (None or {} for its defaults).

        Raises:
            ValueError: an unknown key (names the valid ones) or a value the settings class refuses.
        """
        settings = dict(settings or {})
        valid = [f.name for f in fields(cls.settings_class)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown settings {unknown} for compression method {cls.name!r}; valid settings: {valid}"
            )
        return cls.settings_class(**settings)

    @classmethod
    def check_config(cls, config, settings, num_tokens: int | None, num_kept: int | None) -> None:
        """Raise ValueError when `config` cannot run this method (layer counts, budgets); `settings` is an
        instance of `settings_class`, `num_tokens` the patch tokens per image (None when unknown) and
        `num_kept` the placeholders per image (None without compression)."""

    @classmethod
    def from_config(cls, config) -> CompressionMethod:
        """The method for a `DeftLlavaConfig` (its `compression_settings`, widths, layer counts)."""
        raise NotImplementedError

    def apply_config(self, config) -> None:
        """Settings changed on `model.config` take effect here before each call (budgets and thresholds)."""

    def acts_in(self, hook: str) -> bool:
        """True when this method overrides hook `hook` (the model skips the inputs of hooks nobody overrides)."""
        return getattr(type(self), hook) is not getattr(CompressionMethod, hook)

    @property
    def needs_vision_layer(self) -> bool:
        """The model captures a vision layer's input (`VisualBatch.layer_input`) for this method."""
        return self.needs_cls_attention or self.needs_vision_keys

    def vision_layer_index(self, config) -> int:
        """Which layer that is, as a hidden-states index like `vision_feature_layer` (default: the feature
        layer; -1 is the encoder's last layer, fed `hidden_states[-2]`)."""
        return config.vision_feature_layer

    # ------------------------------------------------------------------ hooks, in the order the model calls them
    # Each hook gets what it uses (the batch's K, the layers and embeddings in its record), never the model.
    def encode_images(self, pixel_values: torch.Tensor, visual: VisualBatch, vision_feature_layer, strategy):
        """Run the vision encoder (`visual.vision_tower`) and projector (`visual.projector`) on `pixel_values`,
        keeping `visual.num_kept` tokens; `vision_feature_layer` and `strategy` are the call's (the config's
        when the call gives none). Return a `DeftVisualFeaturesOutput`, or None for the stock path."""
        return None

    def compress_vision_features(self, features: torch.Tensor, visual: VisualBatch):
        """Compress `(items, N, vision width)` features before the projector; return a `CompressionResult`
        (K rows, their source patches), or None to leave them alone."""
        return None

    def compress_features(self, features, visual: VisualBatch):
        """Compress the projected features (`DeftVisualFeaturesOutput`, one entry per item); return it or a
        new one (rows for the placeholders, `source_indices`, and `rows_used` for content-dependent counts)."""
        return features

    def compress_with_prompt(self, features, prompt: PromptBatch):
        """Compress once the prompt is known; return `features` or a new `DeftVisualFeaturesOutput`."""
        return features

    def run_language_model(self, call: LanguageModelCall):
        """Run the decoder layers; return a `DeftLlavaModelOutputWithPast`, or None for the stock language model."""
        return None

    def reconsider(self, next_token_logits) -> torch.Tensor | None:
        """After a prefill: `(batch,)` bool of the samples that need a second prefill with every usable row, or
        None. `next_token_logits()` computes the `(batch, vocab)` logits of each sample's last position (only
        a method that uses them pays for the head)."""
        return None

    def compress_text(self, text: TextBatch) -> TextSelection | None:
        """Choose the context tokens to keep (called only when `"text"` is in `modalities` and
        `deft_text_retention_ratio` is set); None keeps every one."""
        return None


__all__ = [
    "CompressionMethod",
    "LanguageModelCall",
    "NoSettings",
    "PromptBatch",
    "TextBatch",
    "TextSelection",
    "VisualBatch",
]
