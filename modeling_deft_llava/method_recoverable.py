"""Recoverable Compression: text-guided visual token recovery (https://arxiv.org/abs/2409.01179)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_compressor import (
    CompressionContext,
    CompressionResult,
    TokenCompressor,
    check_choice,
    check_range,
    gather_tokens,
)

VISUAL_SCORES = ("cls_similarity", "cls_attention")


@dataclass(frozen=True)
class RecoverableSettings:
    """Settings of Recoverable Compression.

    Args:
        visual_score: what ranks patches in the visual filter: `cls_similarity` (cosine between
            `context.cls_embedding` and each patch feature, as the paper's text) or `cls_attention`
            (`context.cls_attention`, as the released code).
        iqr_multiplier: the outlier fence is `Q3 + iqr_multiplier * (Q3 - Q1)` of the scores, in [0, 10];
            1.5 is Tukey's rule.
    """

    visual_score: str = "cls_similarity"
    iqr_multiplier: float = 1.5

    def __post_init__(self):
        check_choice("visual_score", self.visual_score, VISUAL_SCORES)
        check_range("iqr_multiplier", self.iqr_multiplier, 0.0, 10.0)


def outlier_fence(scores: torch.Tensor, valid: torch.Tensor, multiplier: float) -> torch.Tensor:
    """`(batch,)` fence `Q3 + multiplier * (Q3 - Q1)` of each row's valid scores (NaN for an empty row).

    Quantiles use linear interpolation between order statistics (numpy's default).
    """
    masked = scores.float().masked_fill(~valid, float("nan"))  # (batch, N)
    q1, q3 = torch.nanquantile(
        masked, torch.tensor([0.25, 0.75], device=scores.device), dim=1
    )  # (batch,) each
    return q3 + multiplier * (q3 - q1)


def mean_text_embedding(
    text_embeds: torch.Tensor, text_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch, D)` mean of the valid text embeddings, and `(batch,)` bool: the row has any text."""
    if text_mask is None:
        text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
    weights = text_mask.float().unsqueeze(-1)  # (batch, T, 1)
    total = (text_embeds.float() * weights).sum(dim=1)  # (batch, D)
    count = weights.sum(dim=1)  # (batch, 1)
    return total / count.clamp(min=1), count.squeeze(-1) > 0


class DeftLlavaRecoverableCompressor(TokenCompressor):
    """Recoverable Compression: visual filter, text recovery, then cluster-merge the rest, K tokens exactly.

    Recoverable Compression (Chen et al., AAAI 2025, https://arxiv.org/abs/2409.01179), training-free:

    1. Visual filter: visual score `v_i` per patch (see `RecoverableSettings.visual_score`); the set V of
       patches with `v_i` above the outlier fence `Q3 + 1.5 * IQR` of all N scores.
    2. Text recovery: text score `t_i = cos(x_i, mean of the valid question text embeddings)`; the set T of
       patches outside V with `t_i` above the fence of the scores outside V. A row with no valid text
       recovers nothing.
    3. Secondary recovery: the remaining patches are clustered around centres and each cluster is merged to
       one token (the mean of its centre and its members).

    Exact K (so every method gets the same budget): patches are ranked V (by v, descending), then T (by t,
    descending), then the rest (by v, descending); ties go to the lower index. The first
    `k_keep = min(|V| + |T|, K - 1)` are kept unchanged (at least one cluster token always summarises the
    dropped patches); the next `K - k_keep` are cluster centres; every later patch joins the centre of largest
    cosine similarity on `context.vision_keys` (or on the features when no keys are given; ties go to the
    higher-ranked centre). Representative index: the patch itself, or the cluster centre. `scores` is v.

    Differences from the paper/official code: the paper's "dynamic scale filter" (the released code: the
    outlier ratio of sklearn's LocalOutlierFactor on the 1-D scores) is replaced by the parameter-free IQR
    fence, which is batched and deterministic; the released KNN step lets each centre absorb its 32 nearest
    tokens (overlapping, weighted by CLS attention, with a text term), here clusters are a partition by
    nearest centre with a plain mean; the count of clusters is set by K instead of a third outlier ratio.
    """

    name = "recoverable"
    needs_cls_token = True  # both visual scores read the CLS token (its embedding or its attention)
    needs_text = True
    stage = "features_with_text"  # inside the model: after the prompt's text embeddings are known
    settings_class = RecoverableSettings

    def __init__(self, token_dim: int, settings: RecoverableSettings | None = None):
        super().__init__(token_dim, settings)
        # the visual score decides which input the model must provide
        self.needs_cls_attention = self.settings.visual_score == "cls_attention"

    def check_inputs(self, image_features: torch.Tensor, context: CompressionContext) -> None:
        super().check_inputs(image_features, context)
        if self.settings.visual_score == "cls_similarity" and context.cls_embedding is None:
            raise ValueError(
                "recoverable with visual_score='cls_similarity' needs context.cls_embedding (batch_size, hidden_size); "
                "pass it, or use visual_score='cls_attention' with context.cls_attention"
            )

    def visual_scores(self, image_features: torch.Tensor, context: CompressionContext) -> torch.Tensor:
        """`(batch, N)` visual score of every patch."""
        if self.settings.visual_score == "cls_attention":
            return context.cls_attention.float()
        return F.cosine_similarity(image_features.float(), context.cls_embedding.float().unsqueeze(1), dim=-1)

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        batch, num_patches, _ = image_features.shape
        k = context.num_kept
        multiplier = self.settings.iqr_multiplier
        everything = torch.ones(batch, num_patches, dtype=torch.bool, device=image_features.device)

        visual = self.visual_scores(image_features, context)  # (batch, N)
        in_v = visual > outlier_fence(visual, everything, multiplier).unsqueeze(1)  # (batch, N)
        text, has_text = mean_text_embedding(context.text_embeds, context.text_mask)  # (batch, D), (batch,)
        text_score = F.cosine_similarity(image_features.float(), text.unsqueeze(1), dim=-1)  # (batch, N)
        in_t = text_score > outlier_fence(text_score, ~in_v, multiplier).unsqueeze(1)
        in_t = in_t & ~in_v & has_text.unsqueeze(1)  # (batch, N)

        # rank: group (V=0, T=1, rest=2) ascending, then the group's score descending, then index
        group = torch.full_like(visual, 2, dtype=torch.long).masked_fill(in_t, 1).masked_fill(in_v, 0)
        within = torch.where(in_t, text_score, visual)  # (batch, N)
        order = within.sort(dim=1, descending=True, stable=True).indices  # (batch, N)
        order = order.gather(1, group.gather(1, order).sort(dim=1, stable=True).indices)  # (batch, N)

        k_keep = (in_v.sum(1) + in_t.sum(1)).clamp(max=k - 1)  # (batch,)
        slots, members = order[:, :k], order[:, k:]  # (batch, K), (batch, N - K)
        is_centre = torch.arange(k, device=slots.device).unsqueeze(0) >= k_keep.unsqueeze(1)  # (batch, K)

        metric = context.vision_keys if context.vision_keys is not None else image_features
        metric = F.normalize(metric.float(), dim=-1)
        similarity = gather_tokens(metric, members) @ gather_tokens(metric, slots).transpose(
            1, 2
        )  # (batch, N-K, K)
        similarity = similarity.masked_fill(~is_centre.unsqueeze(1), float("-inf"))
        assign = similarity.argmax(dim=2)  # (batch, N - K), slot of each member

        features = image_features.float()
        sums = gather_tokens(features, slots).clone()  # (batch, K, D), every slot starts with itself
        sums.scatter_add_(
            1, assign.unsqueeze(-1).expand(-1, -1, features.shape[-1]), gather_tokens(features, members)
        )
        counts = torch.ones(batch, k, device=features.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )
        tokens = (sums / counts.unsqueeze(-1)).to(image_features.dtype)  # (batch, K, D)
        return CompressionResult(tokens=tokens, kept_indices=slots, scores=visual)
