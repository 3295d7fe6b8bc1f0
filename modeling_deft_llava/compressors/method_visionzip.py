"""VisionZip: dominant tokens by CLS attention plus merged contextual tokens (https://arxiv.org/abs/2412.04467)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_compressor import (
    FEATURE_SPACES,
    CompressionContext,
    CompressionResult,
    TokenCompressor,
    check_choice,
    check_range,
    gather_tokens,
)


@dataclass(frozen=True)
class VisionZipSettings:
    """Settings of VisionZip.

    Args:
        contextual_ratio: share of the K output tokens that are contextual (merged) tokens, in [0, 1).
            The contextual count is `min(floor(K * ratio + 0.5), K - 1)`, the rest are dominant tokens.
            Default 0.15625 = 10 / 64, the paper's 54 dominant + 10 contextual split at 64 tokens
            (108 + 20 at 128, 162 + 30 at 192 give the same ratio).
        feature_space: `"vision"` (official): select and merge the vision features of the feature layer, then
            project the K tokens (`proj(target + mean(members))`); `"projected"`: select and merge the
            projector's output (`proj(target) + mean(proj(members))`, this project's earlier behaviour).
    """

    contextual_ratio: float = 0.15625
    feature_space: str = "vision"

    def __post_init__(self):
        check_range("contextual_ratio", self.contextual_ratio, 0.0, 1.0, high_open=True)
        check_choice("feature_space", self.feature_space, FEATURE_SPACES)


def visionzip_split(num_kept: int, contextual_ratio: float) -> tuple[int, int]:
    """`(dominant, contextual)` counts summing to K, with at least one dominant token."""
    contextual = min(int(num_kept * contextual_ratio + 0.5), num_kept - 1)
    return num_kept - contextual, contextual


def contextual_target_positions(num_rest: int, num_contextual: int) -> torch.Tensor:
    """Positions, among the `num_rest` non-dominant tokens in patch order, of the contextual targets.

    As the official code: `arange(0, num_rest, step)[:num_contextual]` with `step = max(1, num_rest // num_contextual)`.
    """
    step = max(1, num_rest // num_contextual)
    return torch.arange(0, num_rest, step)[:num_contextual]


class DeftLlavaVisionZipCompressor(TokenCompressor):
    """VisionZip: keep the most-attended patches, merge the rest into a few contextual tokens.

    VisionZip (Yang et al., CVPR 2025, https://arxiv.org/abs/2412.04467):

    1. Dominant tokens: the `d` patches with the largest CLS attention (`context.cls_attention`, taken at the
       penultimate vision layer in the paper), kept unchanged.
    2. Contextual tokens: the other `N - d` patches, in patch order; `c` of them, uniformly spaced (see
       `contextual_target_positions`), are targets. Every other remaining patch is assigned to the target of
       largest cosine similarity on `context.vision_keys` (the layer's keys, as the paper) or, when those are
       not given, on the image features. A contextual token is `target + mean(assigned patches)`, exactly as
       the released code (a target with nothing assigned stays itself).

    K = d + c exactly, with `c = min(floor(K * contextual_ratio + 0.5), K - 1)`. Representative index: the
    dominant patch itself, and the target patch for a contextual token. The output is ordered by that index.
    `scores` is the CLS attention.

    In the model (official code's LLaVA integration): CLS attention and keys come from the feature layer
    (`vision_feature_layer`, -2 for LLaVA-1.5), recomputed from its input (SDPA stays on); with the default
    `feature_space="vision"` the method runs on that layer's patch states and the projector sees the K merged
    states.

    Differences from the paper/official code: the official code concatenates [CLS, dominant, contextual];
    here CLS is not among the features (LLaVA drops it) and the output is in patch order. Similarity ties
    go to the first target. `feature_space="projected"` (not the default) merges projected features instead.
    """

    name = "visionzip"
    needs_cls_token = True
    needs_cls_attention = True
    needs_vision_keys = True
    settings_class = VisionZipSettings

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        batch, num_patches, dim = image_features.shape
        num_dominant, num_contextual = visionzip_split(context.num_kept, self.settings.contextual_ratio)
        scores = context.cls_attention.float()  # (batch, N)
        dominant = scores.topk(num_dominant, dim=1).indices  # (batch, d)
        if num_contextual == 0:
            return CompressionResult(gather_tokens(image_features, dominant), dominant, context.cls_attention)

        is_dominant = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, dominant, True)  # (batch, N)
        # the non-dominant patches in patch order: a stable sort puts False (0) first, keeping order
        rest = is_dominant.to(torch.uint8).sort(dim=1, stable=True).indices[:, : num_patches - num_dominant]
        num_rest = rest.shape[1]
        target_pos = contextual_target_positions(num_rest, num_contextual).to(rest.device)  # (c,)
        is_target = torch.zeros(num_rest, dtype=torch.bool, device=rest.device)
        is_target[target_pos] = True
        targets = rest[:, target_pos]  # (batch, c) patch indices
        members = rest[:, ~is_target]  # (batch, num_rest - c) patch indices

        metric = context.vision_keys if context.vision_keys is not None else image_features
        metric = F.normalize(metric.float(), dim=-1)  # (batch, N, k)
        similarity = gather_tokens(metric, members) @ gather_tokens(metric, targets).transpose(1, 2)
        assign = similarity.argmax(dim=2)  # (batch, num_members), index into targets
        one_hot = F.one_hot(assign, num_contextual).to(torch.float32)  # (batch, num_members, c)
        counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (batch, c, 1)
        member_tokens = gather_tokens(image_features, members).float()  # (batch, num_members, D)
        aggregated = one_hot.transpose(1, 2) @ member_tokens / counts  # (batch, c, D)
        contextual = gather_tokens(image_features, targets).float() + aggregated  # (batch, c, D)

        tokens = torch.cat(
            [gather_tokens(image_features, dominant), contextual.to(image_features.dtype)], dim=1
        )
        kept = torch.cat([dominant, targets], dim=1)  # (batch, K)
        return CompressionResult(tokens=tokens, kept_indices=kept, scores=context.cls_attention)
