"""Left-padded re-packing of token sequences after some tokens are dropped (shared by the model and FastV).

Imports: torch only.
"""

from __future__ import annotations

import torch


def repack_left(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded compaction of the True entries of `keep` `(batch, seq)`.

    Returns `gather_index` `(batch, seq')` (-1 on padding) and `attention_mask` `(batch, seq')`, with
    seq' = max kept per row; kept tokens keep their order.
    """
    batch, seq = keep.shape
    counts = keep.sum(1)  # (batch,)
    width = int(counts.max()) if batch else 0
    # order: padding slots first (key -1), kept tokens in original order after them
    arange = torch.arange(seq, device=keep.device).expand(batch, seq)
    key = torch.where(keep, arange, torch.full_like(arange, -1))
    sorted_idx = key.sort(dim=1).values[:, seq - width :]  # (batch, width)
    attention_mask = (sorted_idx >= 0).long()
    return sorted_idx, attention_mask


def gather_seq(tensor: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    """`tensor` `(batch, seq, ...)` at `index` `(batch, seq')` (-1 -> `fill`)."""
    safe = index.clamp(min=0)
    view = safe.view(*safe.shape, *([1] * (tensor.dim() - 2))).expand(*safe.shape, *tensor.shape[2:])
    out = torch.gather(tensor, 1, view)
    pad = (index < 0).view(*index.shape, *([1] * (tensor.dim() - 2)))
    return out.masked_fill(pad, fill)


def scatter_seq(values: torch.Tensor, index: torch.Tensor, seq: int) -> torch.Tensor:
    """Inverse of `gather_seq`: `values` `(batch, seq', ...)` put back at `index` in a zero `(batch, seq, ...)`."""
    out = values.new_zeros(values.shape[0], seq + 1, *values.shape[2:])  # slot `seq` takes the padding
    safe = index.masked_fill(index < 0, seq)
    view = safe.view(*safe.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return out.scatter(1, view, values)[:, :seq]
