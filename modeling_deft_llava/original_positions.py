"""Original position ids for compressed sequences: kept visual tokens and the text after them keep the
positions they had before compression (the gaps stay)."""

from __future__ import annotations

import torch


def scatter_rows(mask: torch.Tensor, values: torch.Tensor, fill=0) -> torch.Tensor:
    """Place flat per-row `values` `(num_rows,)` at the True entries of `mask` `(batch, seq)` (row-major)."""
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=mask.device)
    out[mask] = values.to(mask.device)
    return out


def original_position_ids(
    valid: torch.Tensor, visual: torch.Tensor, source_index: torch.Tensor, advance: torch.Tensor
) -> torch.Tensor:
    """Position ids that keep the uncompressed layout, `(batch, seq)`.

    Args:
        valid: `(batch, seq)` bool, False on padding.
        visual: `(batch, seq)` bool, True on placeholder rows.
        source_index: `(batch, seq)` long, patch index of each visual row (0 elsewhere).
        advance: `(batch, seq)` long, how far the position counter moves after this token: 1 for a text
            token, N for the LAST row of an image of N patches, 0 for other rows and padding.

    A text token sits at the counter; a visual row at the counter value where its image starts plus its patch
    index. Padding gets 0.
    """
    before = torch.cumsum(advance, dim=1) - advance  # (batch, seq) counter before each token
    positions = before + torch.where(visual, source_index, torch.zeros_like(source_index))
    return positions.masked_fill(~valid, 0)
