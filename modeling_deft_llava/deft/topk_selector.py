"""Phase 3a of DeFT: top-k selection that keeps the original token order (batched, padding-aware)."""

from __future__ import annotations

import torch

from ..configuration.deft_settings import num_kept_tokens
from .score_mixer import normalize_per_sample


def kept_counts(num_valid: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """Per-sample k for `(batch,)` valid-token counts: `max(1, floor(ratio * n + 0.5))` (0 for empty rows)."""
    k = torch.floor(num_valid.double() * retention_ratio + 0.5).long().clamp(min=1)
    return torch.minimum(k, num_valid.long())


def select_topk(
    scores: torch.Tensor, retention_ratio: float, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the top-k scores of each row, sorted ascending (original order).

    Args:
        scores: `(batch_size, num_tokens)`; higher is more important. Must be finite on valid tokens.
        retention_ratio: share kept, in (0, 1].
        token_mask: optional `(batch_size, num_tokens)` bool, False on padding; padding is never kept and k
            is computed from each row's own number of valid tokens. Equal scores then go to the earlier token.

    Returns:
        kept_indices `(batch_size, k_max)` long, ascending within the valid part of each row;
        kept_mask `(batch_size, k_max)` bool, False on the slots of rows that keep fewer than k_max tokens
        (those slots hold index 0).
    """
    batch, n = scores.shape
    if token_mask is None:
        k = num_kept_tokens(n, retention_ratio)
        top = scores.topk(k, dim=1).indices  # (batch, k)
        kept, _ = top.sort(dim=1)
        return kept, torch.ones_like(kept, dtype=torch.bool)
    counts = kept_counts(token_mask.sum(1), retention_ratio)  # (batch,)
    k_max = int(counts.max().item()) if batch else 0
    masked = scores.float().masked_fill(~token_mask, float("-inf"))
    # best first, ties to the earlier token (a stable sort): text repeats words, whose scores tie exactly, and
    # `topk` breaks ties by the row's width, so a padded row would keep other tokens than the same row alone
    top = masked.sort(dim=1, descending=True, stable=True).indices[:, : max(k_max, 1)]  # (batch, k_max)
    rank = torch.arange(top.shape[1], device=scores.device).unsqueeze(0)  # (1, k_max)
    kept_mask = rank < counts.unsqueeze(1)  # (batch, k_max)
    # push unused slots past every real index, sort, then point them at index 0
    kept, order = top.masked_fill(~kept_mask, n).sort(dim=1)
    kept_mask = torch.gather(kept_mask, 1, order)
    return kept.masked_fill(~kept_mask, 0), kept_mask


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`(batch, N, D)` tokens at `(batch, k)` indices -> `(batch, k, D)`."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def select_with_coverage(
    scores: torch.Tensor,
    semantic: torch.Tensor,
    retention_ratio: float,
    coverage_weight: float,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with a redundancy penalty: greedy maximal marginal relevance (Carbonell & Goldstein, 1998).

    Each step keeps the token with the largest `(1 - w) * q_i - w * max(0, max_{j kept} cos(z_i, z_j))`, where
    `q` is the score min-max normalised over the row's valid tokens and `z` the semantic tokens. `w = 0` keeps
    the same set as `select_topk` (ties aside); the loop runs k times (k sequential steps of `(batch, N)` work).

    Args:
        scores: `(batch_size, num_tokens)`, higher is more important (padding may hold -inf).
        semantic: `(batch_size, num_tokens, dim)` the tokens whose cosine similarity measures redundancy.
        retention_ratio: share kept, in (0, 1]; coverage_weight: `w` in [0, 1).
        token_mask: optional `(batch_size, num_tokens)` bool, False on padding (never kept).

    Returns:
        kept_indices, kept_mask: as `select_topk` (ascending indices, unused slots of short rows at index 0).
    """
    batch, n = scores.shape
    valid = token_mask if token_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    counts = kept_counts(valid.sum(1), retention_ratio)  # (batch,)
    k_max = max(int(counts.max().item()) if batch else 0, 1)
    quality = normalize_per_sample(scores, valid)  # (batch, N) in [0, 1]
    unit = torch.nn.functional.normalize(semantic.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (batch, N, N)
    rows = torch.arange(batch, device=scores.device)
    taken = ~valid  # (batch, N): padding counts as taken
    redundancy = torch.zeros_like(quality)  # (batch, N) max similarity to a kept token, clamped at 0
    picks = []
    for _ in range(k_max):
        value = ((1.0 - coverage_weight) * quality - coverage_weight * redundancy).masked_fill(
            taken, float("-inf")
        )
        pick = value.argmax(1)  # (batch,) ties: the earlier token
        picks.append(pick)
        taken = taken.clone()
        taken[rows, pick] = True
        redundancy = torch.maximum(redundancy, similarity[rows, pick].clamp_min(0.0))
    top = torch.stack(picks, dim=1)  # (batch, k_max), pick order
    rank = torch.arange(k_max, device=scores.device).unsqueeze(0)
    kept_mask = rank < counts.unsqueeze(1)  # (batch, k_max)
    kept, order = top.masked_fill(~kept_mask, n).sort(dim=1)
    kept_mask = torch.gather(kept_mask, 1, order)
    return kept.masked_fill(~kept_mask, 0), kept_mask
