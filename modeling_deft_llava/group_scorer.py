"""FGCS component 3: group-aware scores `s_group` from each token's neighbourhood.

A token scores high when its neighbours are salient and semantically close to it, so whole objects
(images), whole events (video) or whole phrases (text) are kept together:

    s_group_i = mean_{j in N(i)} w_ij * s_sem_j,   w_ij = (1 + cos(z_i, z_j)) / 2  in [0, 1]

Neighbourhoods `N(i)` (seed README):
- image: the 8-connected (or 4-connected) grid neighbours, `spatial_shape = (rows, cols)`;
- video: the same patch in frames t-window .. t+window (t excluded), frames of `spatial_shape` patches;
- text: the top-k semantic neighbours by cosine similarity (self and padding excluded).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def _grid_neighbors(rows: int, cols: int, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour table of a `rows x cols` grid: `(num_tokens, M)` indices and validity (border cells)."""
    if connectivity == 8:
        offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    else:
        offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    r = torch.arange(rows).view(-1, 1).expand(rows, cols).reshape(-1)  # (N,)
    c = torch.arange(cols).view(1, -1).expand(rows, cols).reshape(-1)  # (N,)
    nr = torch.stack([r + dr for dr, _ in offsets], dim=1)  # (N, M)
    nc = torch.stack([c + dc for _, dc in offsets], dim=1)  # (N, M)
    valid = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
    index = (nr.clamp(0, rows - 1) * cols + nc.clamp(0, cols - 1)).long()
    return index, valid


@lru_cache(maxsize=64)
def _video_neighbors(num_frames: int, frame_size: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same patch in frames `t-window..t+window` (t excluded): `(num_frames * frame_size, 2 * window)`."""
    t = torch.arange(num_frames).repeat_interleave(frame_size)  # (N,) frame of each token
    p = torch.arange(frame_size).repeat(num_frames)  # (N,) patch of each token
    deltas = [d for d in range(-window, window + 1) if d != 0]
    if not deltas:  # window 0: no temporal neighbours at all
        return torch.zeros(t.numel(), 1, dtype=torch.long), torch.zeros(t.numel(), 1, dtype=torch.bool)
    nt = torch.stack([t + d for d in deltas], dim=1)  # (N, M)
    valid = (nt >= 0) & (nt < num_frames)
    index = nt.clamp(0, num_frames - 1) * frame_size + p.view(-1, 1)
    return index.long(), valid


def _text_neighbors(
    unit: torch.Tensor, k: int, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours per token: `(batch, N, k)` indices and validity."""
    batch, n, _ = unit.shape
    sim = unit @ unit.transpose(1, 2)  # (batch, N, N)
    blocked = torch.eye(n, dtype=torch.bool, device=unit.device).unsqueeze(0)  # (1, N, N): no self
    if token_mask is not None:
        blocked = blocked | ~token_mask[:, None, :]  # (batch, N, N): no padding neighbours
    sim = sim.masked_fill(blocked, float("-inf"))
    kk = min(k, n - 1) if n > 1 else 0
    if kk == 0:
        return torch.zeros(batch, n, 1, dtype=torch.long, device=unit.device), torch.zeros(
            batch, n, 1, dtype=torch.bool, device=unit.device
        )
    values, index = sim.topk(kk, dim=-1)  # (batch, N, kk)
    return index, torch.isfinite(values)


def group_scores(
    semantic_tokens: torch.Tensor,
    saliency: torch.Tensor,
    modality: str,
    spatial_shape: tuple[int, int] | None,
    token_mask: torch.Tensor | None,
    *,
    image_neighbors: int,
    video_window: int,
    text_neighbors: int,
) -> torch.Tensor:
    """Group scores for `(batch, N, semantic_dim)` tokens and `(batch, N)` saliency -> `(batch, N)`.

    `saliency` should already be normalised per sample (non-negative), so that the neighbour mean is a
    share of salient neighbourhood. Tokens without any valid neighbour score 0.
    """
    batch, n, dim = semantic_tokens.shape
    unit = F.normalize(semantic_tokens.float(), dim=-1)  # (batch, N, D)
    if modality == "image":
        index, valid = _grid_neighbors(spatial_shape[0], spatial_shape[1], image_neighbors)
        index, valid = (
            index.to(unit.device).expand(batch, -1, -1),
            valid.to(unit.device).expand(batch, -1, -1),
        )
    elif modality == "video":
        frame_size = spatial_shape[0] * spatial_shape[1]
        index, valid = _video_neighbors(n // frame_size, frame_size, video_window)
        index, valid = (
            index.to(unit.device).expand(batch, -1, -1),
            valid.to(unit.device).expand(batch, -1, -1),
        )
    else:
        index, valid = _text_neighbors(unit, text_neighbors, token_mask)
    m = index.shape[-1]
    flat = index.reshape(batch, n * m)  # (batch, N*M)
    neigh_unit = torch.gather(unit, 1, flat.unsqueeze(-1).expand(-1, -1, dim)).view(batch, n, m, dim)
    neigh_sal = torch.gather(saliency.float(), 1, flat).view(batch, n, m)  # (batch, N, M)
    if token_mask is not None:
        valid = valid & torch.gather(token_mask, 1, flat).view(batch, n, m)
    weight = (1.0 + (unit.unsqueeze(2) * neigh_unit).sum(-1)) / 2.0  # (batch, N, M), cos -> [0, 1]
    weight = weight * valid
    count = valid.sum(-1).clamp(min=1)  # (batch, N)
    return (weight * neigh_sal).sum(-1) / count
