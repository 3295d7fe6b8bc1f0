"""Uniform (strided) pruning baseline: K patches evenly spaced over the raster order."""

from __future__ import annotations

import torch

from .compression_method import NoSettings
from .token_compressor import CompressionContext, CompressionResult, TokenCompressor, gather_tokens


def uniform_indices(num_patches: int, num_kept: int) -> torch.Tensor:
    """`(num_kept,)` indices `floor((i + 0.5) * N / K)` for `i = 0 .. K-1`: the middle of K equal slices.

    Computed in integers as `((2i + 1) * N) // (2K)`; strictly ascending because `N / K >= 1`.
    """
    i = torch.arange(num_kept)
    return ((2 * i + 1) * num_patches) // (2 * num_kept)


class DeftLlavaUniformCompressor(TokenCompressor):
    """Keep K patches strided evenly over the raster (row-major) order; input-independent.

    With K = N / s for an integer stride s this keeps every s-th patch, offset by s // 2.
    """

    name = "uniform"
    token_layouts = ("grid", "sequence")  # never reads 2-D neighbours
    settings_class = NoSettings

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        batch, num_patches, _ = image_features.shape
        kept = uniform_indices(num_patches, context.num_kept).to(image_features.device)
        kept = kept.unsqueeze(0).expand(batch, -1)  # (batch, K)
        return CompressionResult(tokens=gather_tokens(image_features, kept), kept_indices=kept)
