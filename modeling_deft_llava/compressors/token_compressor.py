"""Shared interface of the visual-token compression baselines (one method per `method_<name>.py` file).

A compressor maps the patch features of one image per batch row, `(batch_size, num_patches, hidden_size)`,
to exactly `num_kept` tokens per row, and says which patch each output token stands for. The base class
does the shared work once: input checks, the keep-everything shortcut, and ordering the output by patch
index. A method writes only `compress`.

Imports: torch, the standard library, `compression_method`, `vision_attention` and `topk_selector.gather_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..deft.topk_selector import gather_tokens
from ..modeling_outputs_deft_llava import updated
from .compression_method import CompressionMethod, VisualBatch
from .vision_attention import cls_attention, patch_keys


@dataclass
class CompressionContext:
    """Everything a method may need besides the image features.

    Args:
        spatial_shape: `(rows, cols)` of the patch grid of one image; `rows * cols` must equal `num_patches`.
        num_kept: K, the number of tokens every row gets, `1 <= K <= num_patches`.
        cls_attention: `(batch_size, num_patches)` attention the CLS query pays to each patch at the vision
            layer used, averaged over heads (see `vision_attention.cls_attention`).
        vision_keys: `(batch_size, num_patches, key_dim)` optional key (or feature) vectors for similarity.
        cls_embedding: `(batch_size, hidden_size)` the CLS token's feature, in the space of the image features.
        text_embeds: `(batch_size, text_len, hidden_size)` question text embeddings in the space of the image
            features (the model's own input embeddings of the prompt text).
        text_mask: `(batch_size, text_len)` bool, True on real text tokens; None means all are real.
        seed: seed of methods with randomness.
    """

    spatial_shape: tuple[int, int]
    num_kept: int
    cls_attention: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    cls_embedding: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    seed: int = 0


@dataclass
class CompressionResult:
    """Output of a compressor.

    Args:
        tokens: `(batch_size, num_kept, hidden_size)`, in the dtype of the input features.
        kept_indices: `(batch_size, num_kept)` long, strictly ascending per row. For pruning methods, the kept
            patch; for merging methods, the patch that represents the merged token (each method documents
            its rule). The model gives each output token the position id of that patch.
        scores: `(batch_size, num_patches)` importance scores the method ranked by, or None.
    """

    tokens: torch.Tensor
    kept_indices: torch.Tensor
    scores: torch.Tensor | None = None


class MethodModule(CompressionMethod, nn.Module):
    """A compression method that is an `nn.Module` built from `(token_dim, settings)` (every baseline).

    Args:
        token_dim: hidden_size of the features this method will see.
        settings: an instance of `settings_class` (defaults when None).
    """

    def __init__(self, token_dim: int, settings=None):
        nn.Module.__init__(self)
        if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"token_dim must be a positive int, got {token_dim!r}")
        if settings is None:
            settings = self.settings_class()
        if not isinstance(settings, self.settings_class):
            raise TypeError(
                f"{type(self).__name__} takes settings of type {self.settings_class.__name__}, "
                f"got {type(settings).__name__}"
            )
        self.token_dim = token_dim
        self.settings = settings

    @classmethod
    def from_config(cls, config) -> MethodModule:
        """Built for the language model's hidden size (the projected features)."""
        return cls(config.text_config.hidden_size, cls.settings_class(**(config.compression_settings or {})))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, token_dim={self.token_dim}, settings={self.settings}"


class TokenCompressor(MethodModule):
    """Base class: reduce `(batch_size, num_patches, hidden_size)` image features to `num_kept` tokens per row.

    Subclasses set `name`, `settings_class`, the `needs_*` flags, and implement `compress`, which may return
    its tokens in any order: `forward` sorts them by `kept_indices`. The model calls the method through the
    hooks of `CompressionMethod`; this class implements the two that compress features:
    `compress_features` (the projector's output, `feature_space="projected"`) or `compress_vision_features`
    (the vision features that enter the projector, `feature_space="vision"`: the model projects the K
    compressed tokens, as methods that merge or pool CLIP states do in their official code). A method whose
    settings have a `feature_space` field follows it. With `needs_cls_attention` / `needs_vision_keys` the
    feature layer's CLS attention row and head-averaged keys are computed from the layer's input and passed
    as `context.cls_attention` / `context.vision_keys`.
    """

    @property
    def feature_space(self) -> str:
        """`"projected"` or `"vision"`: which features this method compresses (see the class doc)."""
        return getattr(self.settings, "feature_space", "projected")

    @classmethod
    def from_config(cls, config) -> TokenCompressor:
        """Built for the width of the features it compresses: the language model's hidden size, or the vision
        width (times the number of feature layers) for `feature_space="vision"`."""
        settings = cls.settings_class(**(config.compression_settings or {}))
        width = config.text_config.hidden_size
        if getattr(settings, "feature_space", "projected") == "vision":
            layers = config.vision_feature_layer
            width = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        return cls(width, settings)

    def context_for(self, visual: VisualBatch) -> CompressionContext:
        """The `CompressionContext` of a batch of items: budget, grid and the vision inputs it needs."""
        layer, x = visual.vision_layer, visual.layer_input
        return CompressionContext(
            spatial_shape=visual.spatial_shape,
            num_kept=visual.num_kept,
            cls_attention=cls_attention(layer, x) if self.needs_cls_attention and x is not None else None,
            vision_keys=patch_keys(layer, x) if self.needs_vision_keys and x is not None else None,
        )

    def compress_vision_features(self, features: torch.Tensor, visual: VisualBatch):
        if self.feature_space != "vision":
            return None
        return self(features, self.context_for(visual))

    def compress_features(self, features, visual: VisualBatch):
        if self.feature_space != "projected" or not features.pooler_output:
            return features
        tokens = torch.stack(list(features.pooler_output))  # (items, N, D)
        out = self(tokens, self.context_for(visual))
        return updated(
            features,
            pooler_output=list(out.tokens),  # K rows per item
            source_indices=list(out.kept_indices),
            compression_scores=out.scores,
        )

    def forward(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        """Compress `(batch_size, num_patches, hidden_size)` features to `(batch_size, num_kept, hidden_size)`."""
        self.check_inputs(image_features, context)
        batch, num_patches, _ = image_features.shape
        if context.num_kept == num_patches:
            # keep everything: the input itself, untouched
            kept = torch.arange(num_patches, device=image_features.device).expand(batch, -1)
            return CompressionResult(tokens=image_features, kept_indices=kept, scores=None)
        result = self.compress(image_features, context)
        return sort_by_index(result)

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        """The method itself; called only with valid inputs and `num_kept < num_patches`."""
        raise NotImplementedError

    def check_inputs(self, image_features: torch.Tensor, context: CompressionContext) -> None:
        """Raise ValueError with the offending value when the inputs do not fit together."""
        if image_features.dim() != 3:
            raise ValueError(
                f"image_features must be (batch_size, num_patches, hidden_size), got shape {tuple(image_features.shape)}"
            )
        batch, num_patches, dim = image_features.shape
        if dim != self.token_dim:
            raise ValueError(
                f"{self.name}: built for token_dim={self.token_dim}, got features of width {dim}"
            )
        rows, cols = context.spatial_shape
        if rows * cols != num_patches:
            raise ValueError(
                f"spatial_shape {tuple(context.spatial_shape)} holds {rows * cols} patches, "
                f"but image_features has {num_patches}"
            )
        k = context.num_kept
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_patches:
            raise ValueError(f"num_kept must be an int in [1, {num_patches}] (num_patches), got {k!r}")
        if self.needs_cls_attention and context.cls_attention is None:
            raise ValueError(f"{self.name} needs context.cls_attention (batch_size, num_patches); got None")
        if self.needs_text and context.text_embeds is None:
            raise ValueError(
                f"{self.name} needs context.text_embeds (batch_size, text_len, hidden_size); got None"
            )
        expected = {
            "cls_attention": (batch, num_patches),
            "vision_keys": (batch, num_patches, None),
            "cls_embedding": (batch, dim),
            "text_embeds": (batch, None, dim),
            "text_mask": (batch, None),
        }
        for field, shape in expected.items():
            value = getattr(context, field)
            if value is None:
                continue
            ok = value.dim() == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape))
            if not ok:
                want = tuple("*" if s is None else s for s in shape)
                raise ValueError(f"context.{field} must have shape {want}, got {tuple(value.shape)}")
        if context.text_mask is not None and context.text_embeds is not None:
            if context.text_mask.shape != context.text_embeds.shape[:2]:
                raise ValueError(
                    f"context.text_mask shape {tuple(context.text_mask.shape)} does not match "
                    f"text_embeds {tuple(context.text_embeds.shape[:2])}"
                )


def sort_by_index(result: CompressionResult) -> CompressionResult:
    """Reorder the output tokens of every row by ascending `kept_indices` (the original patch order)."""
    kept, order = result.kept_indices.sort(dim=1)  # (batch, K) each
    tokens = gather_tokens(result.tokens, order)  # (batch, K, D)
    return CompressionResult(tokens=tokens, kept_indices=kept, scores=result.scores)


FEATURE_SPACES = ("vision", "projected")


def check_choice(name: str, value, choices: tuple) -> None:
    """Settings helper: ValueError naming the value and the valid choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """Settings helper: ValueError naming the value and the valid interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a number in {_interval(low, high, low_open, high_open)}, got {value!r}"
        )
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or value != value:  # value != value catches NaN
        raise ValueError(f"{name} must be in {_interval(low, high, low_open, high_open)}, got {value!r}")


def _interval(low, high, low_open, high_open) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
