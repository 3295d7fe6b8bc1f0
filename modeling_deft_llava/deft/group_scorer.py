"""FGCS component 3: group-aware scores `s_group` from each token's neighbourhood.

A token scores high when its neighbours are salient and semantically close to it, so whole objects
(images), whole events (video) or whole phrases (text) are kept together:

    s_group_i = mean_{j in N(i)} w_ij * s_sem_j,   w_ij = (1 + cos(z_i, z_j)) / 2  in [0, 1]

Neighbourhoods `N(i)` (seed README):
- image: the 8-connected (or 4-connected) grid neighbours, `spatial_shape = (rows, cols)`; an image of
  several views (`spatial_shape` a tuple of `(rows, cols)` grids, tokens view after view: an AnyRes image's
  base view and tile grid) takes its neighbours inside each view, never across views;
- video: the same patch in frames t-window .. t+window (t excluded), frames of `spatial_shape` patches;
- text: the top-k semantic neighbours by cosine similarity (self and padding excluded).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def grid_views(spatial_shape) -> tuple[tuple[int, int], ...] | None:
    """The views of an image of several grids (`spatial_shape` a tuple of `(rows, cols)` pairs), else None."""
    if spatial_shape is not None and len(spatial_shape) and isinstance(spatial_shape[0], (tuple, list)):
        return tuple((int(r), int(c)) for r, c in spatial_shape)
    return None


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


def _neighbour_kernel(modality: str, image_neighbors: int, video_window: int) -> torch.Tensor:
    """`(kh, kw)` 0/1 kernel of the fixed neighbourhood, centre excluded: 3x3 (8- or 4-connected) for images,
    `(2 * window + 1) x 1` over the frame axis for video."""
    if modality == "image":
        kernel = torch.ones(3, 3)
        if image_neighbors == 4:
            kernel[0, 0] = kernel[0, 2] = kernel[2, 0] = kernel[2, 2] = 0.0
        kernel[1, 1] = 0.0
        return kernel
    kernel = torch.ones(2 * video_window + 1, 1)
    kernel[video_window, 0] = 0.0
    return kernel


@lru_cache(maxsize=64)
def _convolution_constants(
    kernel_key: tuple, dim: int, grid: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise weight `(1 + dim, 1, kh, kw)` and the neighbour count `(1, N)` of a fixed neighbourhood:
    constants of (kernel, width, grid), built once instead of on every call (the count was a second
    convolution per call). `kernel_key`: `_neighbour_kernel`'s arguments. Read-only: never modify them."""
    # plain tensors even when first called under `torch.inference_mode()`: a later training step saves them
    with torch.inference_mode(False), torch.no_grad():
        kernel = _neighbour_kernel(*kernel_key).to(device=device, dtype=dtype)
        weight = kernel.expand(1 + dim, 1, *kernel.shape).contiguous()
        padding = (kernel.shape[0] // 2, kernel.shape[1] // 2)
        ones = torch.ones(1, 1, *grid, dtype=dtype, device=device)
        count = F.conv2d(ones, kernel.view(1, 1, *kernel.shape), padding=padding).reshape(
            1, grid[0] * grid[1]
        )
        return weight, count.clamp(min=1.0)


def _fixed_neighbourhood_scores(
    unit: torch.Tensor, saliency: torch.Tensor, grid: tuple[int, int], kernel_key: tuple
) -> torch.Tensor:
    """Image/video group scores without the `(batch, N, M, D)` neighbour tensor.

    `sum_j w_ij s_j = (sum_j s_j + z_i . sum_j s_j z_j) / 2` for `w_ij = (1 + z_i . z_j) / 2`: one depthwise
    convolution of `[s, s * z]` over the `grid` `(height, width)` with the 0/1 kernel (`_neighbour_kernel` of
    `kernel_key`) gives both neighbour sums; the neighbour count, the same convolution of ones, is a constant
    of the grid (`_convolution_constants`). `(batch, N, D)` unit tokens, `(batch, N)` saliency -> `(batch, N)`."""
    batch, n, dim = unit.shape
    height, width = grid
    weight, count = _convolution_constants(kernel_key, dim, (height, width), unit.dtype, unit.device)
    channels = torch.cat([saliency.unsqueeze(-1), saliency.unsqueeze(-1) * unit], dim=-1)  # (batch, N, 1 + D)
    planes = channels.transpose(1, 2).reshape(batch, 1 + dim, height, width)
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    sums = F.conv2d(planes, weight, padding=padding, groups=1 + dim)  # (batch, 1 + D, H, W)
    sums = sums.reshape(batch, 1 + dim, n).transpose(1, 2)  # (batch, N, 1 + D)
    weighted = (sums[..., 0] + torch.linalg.vecdot(unit, sums[..., 1:])) / 2.0  # (batch, N)
    return weighted / count


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
    views = grid_views(spatial_shape) if modality == "image" else None
    if views is not None:  # each view alone: no neighbour across views
        parts, start = [], 0
        for rows, cols in views:
            part = slice(start, start + rows * cols)
            parts.append(
                group_scores(
                    semantic_tokens[:, part],
                    saliency[:, part],
                    modality,
                    (rows, cols),
                    None if token_mask is None else token_mask[:, part],
                    image_neighbors=image_neighbors,
                    video_window=video_window,
                    text_neighbors=text_neighbors,
                )
            )
            start += rows * cols
        return torch.cat(parts, dim=1)
    batch, n, dim = semantic_tokens.shape
    unit = F.normalize(semantic_tokens.float(), dim=-1)  # (batch, N, D)
    if modality in ("image", "video") and token_mask is None:
        # fixed neighbourhoods: one convolution instead of gathering M neighbours per token
        kernel_key = (modality, image_neighbors, video_window)
        if modality == "image":
            grid = (spatial_shape[0], spatial_shape[1])
        else:
            frame_size = spatial_shape[0] * spatial_shape[1]
            grid = (n // frame_size, frame_size)  # frames x patches: the kernel runs along the frames
        return _fixed_neighbourhood_scores(unit, saliency.float(), grid, kernel_key)
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
