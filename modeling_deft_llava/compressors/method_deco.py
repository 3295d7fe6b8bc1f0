"""DeCo: parameter-free 2D adaptive average pooling of the patch grid (https://arxiv.org/abs/2405.20985)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_compressor import (
    FEATURE_SPACES,
    CompressionContext,
    CompressionResult,
    TokenCompressor,
    check_choice,
)


@dataclass(frozen=True)
class DecoSettings:
    """Settings of DeCo.

    Args:
        feature_space: `"vision"` (the paper's `AvgPoolProjector`): pool the patch features, then project the
            m x m pooled tokens; `"projected"`: pool the projector's output (this project's earlier behaviour).
            On a checkpoint whose projector never saw pooled features both are approximations; the digits
            benchmark uses the default.
    """

    feature_space: str = "vision"

    def __post_init__(self):
        check_choice("feature_space", self.feature_space, FEATURE_SPACES)


def pooled_cell_bounds(size: int, out: int, i: int) -> tuple[int, int]:
    """Rows (or cols) `[start, end)` of cell i when `size` is pooled to `out`, as `adaptive_avg_pool2d`."""
    return (i * size) // out, -((-(i + 1) * size) // out)  # floor(i*size/out), ceil((i+1)*size/out)


def cell_centres(size: int, out: int) -> torch.Tensor:
    """`(out,)` centre row of each pooled cell: `floor((start + end - 1) / 2)`, the first of the two
    middle rows when the cell has an even size."""
    centres = []
    for i in range(out):
        start, end = pooled_cell_bounds(size, out, i)
        centres.append((start + end - 1) // 2)
    return torch.tensor(centres, dtype=torch.long)


def valid_square_counts(rows: int, cols: int) -> list[int]:
    """Every K DeCo accepts for a `rows x cols` grid: m*m for m = 1 .. min(rows, cols)."""
    return [m * m for m in range(1, min(rows, cols) + 1)]


class DeftLlavaDecoCompressor(TokenCompressor):
    """DeCo: average-pool the `(rows, cols)` patch grid down to an `m x m` grid, K = m * m.

    DeCo (Yao et al., https://arxiv.org/abs/2405.20985) replaces a compressive projector by
    `nn.AdaptiveAvgPool2d((m, m))` over the patch grid, then the usual MLP projector. Pooled cell (i, j)
    covers rows `floor(i*R/m) .. ceil((i+1)*R/m) - 1` and the same rule on columns (cells may overlap by one
    patch when m does not divide R).

    Output order is raster order of the pooled grid. The representative patch of cell (i, j) is its centre,
    `(floor((r0 + r1 - 1) / 2), floor((c0 + c1 - 1) / 2))` for the cell's `[r0, r1) x [c0, c1)` (the first of
    the two middle patches when a side is even), which is
    strictly ascending in raster order because m <= min(R, C).

    Differences from the paper: none in the pooling (default `feature_space="vision"`: pool, then project, as
    DeCo's `AvgPoolProjector`); the paper trains its projector with the pooling in place, here the pooling can
    also run training-free in front of a projector trained on all patches.
    """

    name = "deco"
    settings_class = DecoSettings

    @classmethod
    def anyres_refusal(cls, config, settings) -> str | None:
        """Refused on AnyRes images: the budget must be a square that fits each grid."""
        return super().anyres_refusal(config, settings) or (
            "it pools each grid to a square m x m (K a perfect square, m <= the grid's shorter side), and an "
            "AnyRes tile grid's shape and K change with each image's size and aspect ratio (a 4x8 grid at 25% "
            "keeps 8 tokens, no square)"
        )

    @classmethod
    def check_config(cls, config, settings, num_tokens, num_kept) -> None:
        """DeCo pools to a square grid: the budget must be a perfect square."""
        if num_kept is None:
            return
        side = math.isqrt(num_kept)
        if side * side != num_kept:
            lower, upper = side * side, (side + 1) ** 2
            raise ValueError(
                f"deco pools to a square grid: the retention ratio gives {num_kept} of {num_tokens} tokens, "
                f"which is not a perfect square; choose a ratio giving {lower} or {upper} tokens"
            )

    def check_inputs(self, image_features: torch.Tensor, context: CompressionContext) -> None:
        super().check_inputs(image_features, context)
        rows, cols = context.spatial_shape
        k = context.num_kept
        if k == rows * cols:
            return  # keep-all is always valid
        m = math.isqrt(k)
        if m * m != k or m > min(rows, cols):
            valid = valid_square_counts(rows, cols)
            below, above = [v for v in valid if v < k][-1:], [v for v in valid if v > k][:1]
            nearest = below + above  # the valid K just below and just above
            raise ValueError(
                f"deco pools to a square m x m grid with m <= min(rows, cols) = {min(rows, cols)}: "
                f"num_kept must be a perfect square in {valid}, got {k}; nearest valid: {nearest}"
            )

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        batch, _, dim = image_features.shape
        rows, cols = context.spatial_shape
        m = math.isqrt(context.num_kept)
        grid = image_features.transpose(1, 2).reshape(batch, dim, rows, cols)  # (batch, D, R, C)
        pooled = F.adaptive_avg_pool2d(grid, (m, m))  # (batch, D, m, m)
        tokens = pooled.flatten(2).transpose(1, 2)  # (batch, m*m, D), raster order
        centre_rows = cell_centres(rows, m)  # (m,)
        centre_cols = cell_centres(cols, m)  # (m,)
        kept = (centre_rows[:, None] * cols + centre_cols[None, :]).flatten()  # (m*m,), ascending
        kept = kept.to(image_features.device).unsqueeze(0).expand(batch, -1)  # (batch, m*m)
        return CompressionResult(tokens=tokens, kept_indices=kept)
