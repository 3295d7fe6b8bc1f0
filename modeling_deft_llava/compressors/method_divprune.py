"""DivPrune: greedy max-min diversity selection of visual tokens (https://arxiv.org/abs/2503.02175)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compression_method import NoSettings
from .token_compressor import CompressionContext, CompressionResult, TokenCompressor, gather_tokens


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """`(batch, N, D)` -> `(batch, N, N)` pairwise `1 - cos`, in float32."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def divprune_indices(features: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Greedy max-min (farthest point) selection of `num_kept` tokens per row, in selection order.

    Args:
        features: `(batch_size, num_patches, hidden_size)`.
        num_kept: K.

    Returns:
        `(batch_size, num_kept)` long, in the order the tokens were picked (not sorted).
    """
    batch, num_patches, _ = features.shape
    dist = cosine_distances(features)  # (batch, N, N)
    eye = torch.eye(num_patches, dtype=torch.bool, device=features.device)
    # first pick: the most isolated token, the one whose nearest other token is farthest away
    nearest_other = dist.masked_fill(eye, float("inf")).amin(dim=2)  # (batch, N)
    rows = torch.arange(batch, device=features.device)
    picked = torch.empty(batch, num_kept, dtype=torch.long, device=features.device)
    chosen = torch.zeros(batch, num_patches, dtype=torch.bool, device=features.device)
    min_dist = torch.full((batch, num_patches), float("inf"), device=features.device)  # to the picked set
    score = nearest_other
    for step in range(num_kept):
        # argmax returns the first maximum: ties go to the lowest index
        best = score.masked_fill(chosen, float("-inf")).argmax(dim=1)  # (batch,)
        picked[:, step] = best
        chosen[rows, best] = True
        min_dist = torch.minimum(min_dist, dist[rows, best])  # (batch, N)
        score = min_dist
    return picked


class DeftLlavaDivPruneCompressor(TokenCompressor):
    """DivPrune: keep the K tokens that greedily maximise the minimum pairwise cosine distance.

    DivPrune (Alvar et al., CVPR 2025, https://arxiv.org/abs/2503.02175) casts pruning as a Max-Min Diversity
    Problem on the visual tokens and solves it greedily: with `d(i, j) = 1 - cos(x_i, x_j)`, the first token
    is the one whose nearest other token is farthest, `argmax_i min_{j != i} d(i, j)`; each next token is
    `argmax_{i not in S} min_{j in S} d(i, j)`. Training-free, no attention needed, so it runs with SDPA.

    Kept tokens are returned unchanged, in patch order; `scores` is None (the selection is a set, not a
    ranking).

    Differences from the paper/official code: the official first pick takes the second-smallest entry of each
    distance column (assuming the smallest is the token itself); we exclude the diagonal explicitly, which is
    the same except under floating-point ties. Already-picked tokens are masked, so exact duplicates can
    never be picked twice. Ties go to the lowest patch index. Budget: the project's one rule `num_kept_tokens`
    (round half up, shared by the processor and every method); the official code rounds half to even
    (`round`), so N=9 at ratio 0.5 keeps 5 here and 4 there.
    """

    name = "divprune"
    token_layouts = ("grid", "sequence")  # never reads 2-D neighbours
    settings_class = NoSettings

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        kept = divprune_indices(image_features, context.num_kept)  # (batch, K), pick order
        return CompressionResult(tokens=gather_tokens(image_features, kept), kept_indices=kept)
