"""AnyRes (LLaVA-NeXT) compression settings: their defaults, validation, and the token layout of one image.

This file is the single source of the AnyRes defaults: `DeftLlavaNextConfig` and `DeftLlavaNextProcessor` read
them from `AnyResSettings`. The model and the processor both count placeholders with `AnyResLayout.count`, so
their counts cannot drift apart.

A LLaVA-NeXT image is a base view (the whole image at the tower's resolution, `rows x cols` patches) followed by
a tile grid (the tiles' patches stitched into one grid and cropped to the image's aspect ratio, "unpadded"),
each of whose rows ends with the learned `image_newline` token. The stock packed order of one image's N tokens:
the base view in raster order, then the grid row by row, each row `grid_cols` patches and one newline. (With a
single view, the base view is followed by one newline.)

Settings:
- `anyres_budget`: `"image"` (default): the retention ratio applies to each image's whole visual set, base view
  and tile grid together: K = `num_kept_tokens(base + grid, ratio)`, one ranking over both views. `"view"`: each
  view keeps its own `num_kept_tokens(view, ratio)`.
- `anyres_image_newline`: `"keep"` (default): the newline tokens are row markers: every one is kept (never given
  to the method, not counted in the budget), at its original position. `"compress"`: a newline is a token like
  any other: it is the last column of its grid row (the grid the method sees is `grid_rows x (grid_cols + 1)`;
  the single-view image's newline is a 1x1 view of its own), ranked and counted like the patches.

Kept tokens keep their original positions either way (`deft_keep_original_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .deft_settings import num_kept_tokens

ANYRES_BUDGETS = ("image", "view")
ANYRES_NEWLINES = ("keep", "compress")


@dataclass(frozen=True)
class AnyResSettings:
    """Defaults of the AnyRes settings (see the module docstring)."""

    anyres_budget: str = "image"
    anyres_image_newline: str = "keep"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)


ANYRES_DEFAULTS = AnyResSettings()


def validate_anyres_settings(anyres_budget, anyres_image_newline) -> None:
    """Raise ValueError naming the bad value and the valid ones."""
    if anyres_budget not in ANYRES_BUDGETS:
        raise ValueError(f"anyres_budget must be one of {ANYRES_BUDGETS}, got {anyres_budget!r}")
    if anyres_image_newline not in ANYRES_NEWLINES:
        raise ValueError(
            f"anyres_image_newline must be one of {ANYRES_NEWLINES}, got {anyres_image_newline!r}"
        )


@dataclass(frozen=True)
class AnyResLayout:
    """Where one image's tokens sit in the stock packed order.

    Args:
        base_shape: `(rows, cols)` patches of the base view.
        grid_shape: `(rows, cols)` patches of the unpadded tile grid (newlines not counted), or None for an
            image of a single view (the base view, then one newline).
    """

    base_shape: tuple[int, int]
    grid_shape: tuple[int, int] | None

    @property
    def num_tokens(self) -> int:
        """N: the stock packed length, newlines included."""
        rows, cols = self.base_shape
        if self.grid_shape is None:
            return rows * cols + 1
        return rows * cols + self.grid_shape[0] * (self.grid_shape[1] + 1)

    def newline_indices(self) -> list[int]:
        """Packed indices of the newline tokens, in order."""
        base = self.base_shape[0] * self.base_shape[1]
        if self.grid_shape is None:
            return [base]
        rows, cols = self.grid_shape
        return [base + r * (cols + 1) + cols for r in range(rows)]

    def token_sets(self, budget: str, newline: str) -> tuple[list[tuple[list[int], tuple]], list[int]]:
        """What the method ranks, and what is kept without ranking.

        Returns:
            `(sets, always_kept)`: `sets` is a list of `(packed indices, views)`, each one call of the method
            with its own budget (`views`: the `(rows, cols)` grids its tokens fill, in order); `always_kept` are
            the packed indices kept whatever the method does (the newlines when `newline="keep"`).
        """
        validate_anyres_settings(budget, newline)
        base_n = self.base_shape[0] * self.base_shape[1]
        base = (list(range(base_n)), (tuple(self.base_shape),))
        newlines = self.newline_indices()
        if self.grid_shape is None:
            second = ([base_n], ((1, 1),))
        else:
            rows, cols = self.grid_shape
            every = list(range(base_n, self.num_tokens))
            if newline == "keep":
                second = ([i for i in every if i not in set(newlines)], ((rows, cols),))
            else:
                second = (every, ((rows, cols + 1),))
        views = [base]
        if newline == "compress" or self.grid_shape is not None:
            views.append(second)
        always = newlines if newline == "keep" else []
        if budget == "view":
            return views, always
        return [([i for s, _ in views for i in s], tuple(v for _, vs in views for v in vs))], always

    def count(self, retention_ratio: float, budget: str, newline: str) -> int:
        """Placeholders of this image when a K-placeholder method keeps `retention_ratio` of it."""
        sets, always = self.token_sets(budget, newline)
        return sum(num_kept_tokens(len(s), retention_ratio) for s, _ in sets) + len(always)


__all__ = [
    "ANYRES_BUDGETS",
    "ANYRES_DEFAULTS",
    "ANYRES_NEWLINES",
    "AnyResLayout",
    "AnyResSettings",
    "validate_anyres_settings",
]
