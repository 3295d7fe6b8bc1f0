"""FiCoCo-V inside the CLIP vision encoder: filter, correlate, compress (https://arxiv.org/abs/2411.17686).

Runs the encoder layer by layer itself (as `method_tome`), and from `start_layer` on reduces the tokens of
every layer between its attention and its MLP with `ficoco_v_reduce`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .method_tome import DeftLlavaToMeCompressor, tome_schedule
from .token_compressor import CompressionContext, CompressionResult, TokenCompressor, check_range


@dataclass(frozen=True)
class FiCoCoVSettings:
    """Settings of FiCoCo-V (defaults: the paper's / official code's values for LLaVA-1.5).

    Args:
        start_layer: 0-based index of the first encoder layer that reduces tokens (the official
            `control_encoding_layer`, 11 for LLaVA-1.5's 24-layer CLIP). Layers before it see every token.
        cls_weight: beta, weight of the CLS attention in the redundancy score
            `(1 - beta) * patch_to_patch - beta * cls` (0.35 in the official code).
        window: side of the square windows of the local penalty (2: 2x2 windows).
        targets_quantile: a filtered token merges into every kept patch whose attention from it is at least
            this quantile of its attention to the kept patches (token-adaptive number of targets; always at
            least its most-attended kept patch). 0.998 in the official code.
        proportional_attention: add `log(size)` of every key to the attention logits once tokens are merged
            (as ToMe, on whose code FiCoCo's is built); passed as an additive mask, so SDPA stays on.
    """

    start_layer: int = 11
    cls_weight: float = 0.35
    window: int = 2
    targets_quantile: float = 0.998
    proportional_attention: bool = True

    def __post_init__(self):
        for name in ("start_layer", "window"):
            value = getattr(self, name)
            low = 0 if name == "start_layer" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        check_range("cls_weight", self.cls_weight, 0.0, 1.0)
        check_range("targets_quantile", self.targets_quantile, 0.0, 1.0)
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(
                f"proportional_attention must be True or False, got {self.proportional_attention!r}"
            )


def ficoco_v_schedule(num_patches: int, num_kept: int, layers_run: int, start_layer: int) -> list[int]:
    """Tokens removed in each of the `layers_run` layers: 0 before `start_layer`, then ToMe's exact rule.

    The reducing layers follow `tome_schedule` (near-constant r, at most half the patch tokens of a layer,
    exactly N - K in total), so the feature layer holds exactly `num_kept` patch tokens.

    Raises:
        ValueError: `start_layer` is not one of the `layers_run` layers, or K cannot be reached.
    """
    if not 0 <= start_layer < layers_run:
        raise ValueError(
            f"ficoco_v start_layer must be in [0, {layers_run - 1}]: the feature layer is the output of "
            f"encoder layer {layers_run - 1}, got {start_layer}"
        )
    try:
        tail = tome_schedule(num_patches, num_kept, layers_run - start_layer)
    except ValueError as error:
        raise ValueError(
            f"ficoco_v cannot reach {num_kept} of {num_patches} tokens in the {layers_run - start_layer} "
            f"encoder layer(s) from start_layer={start_layer}: {error}"
        ) from None
    return [0] * start_layer + tail


def head_mean_attention(layer: nn.Module, normed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`(batch, T, T)` float32 attention probabilities of a CLIP layer, averaged over heads.

    Recomputed from the layer's own q/k projections of its input `normed` (`layer_norm1(x)`), with the
    same additive `mask` the layer got, so the layer itself can keep running with SDPA.
    """
    attn = layer.self_attn
    batch, length, _ = normed.shape
    q = attn.q_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    k = attn.k_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    logits = q @ k.transpose(2, 3) * attn.scale  # (batch, heads, T, T)
    if mask is not None:
        logits = logits + mask.float()
    return logits.softmax(dim=-1).mean(dim=1)


@dataclass
class FiCoCoStep:
    """Output of `ficoco_v_reduce`: tokens `(batch, T - r, D)`, sizes `(batch, T - r)` float32,
    kept_positions `(batch, T - r)` long ascending (input position of each output token)."""

    tokens: torch.Tensor
    sizes: torch.Tensor
    kept_positions: torch.Tensor


def ficoco_redundancy(
    attention: torch.Tensor, patch_index: torch.Tensor, grid: tuple[int, int], cls_weight: float, window: int
) -> torch.Tensor:
    """Filter score of every patch token, `(batch, P)` float32: higher = more redundant, filtered first.

    `attention`: `(batch, 1 + P, 1 + P)` head-averaged probabilities, CLS first; `patch_index`: `(batch, P)`
    original patch of every current token (raster order on `grid`).

    1. `s_i = (1 - beta) * p2p_i / ||p2p|| - beta * cls_i / ||cls||`, where `p2p_i` is the mean attention patch
       i pays to the patches and `cls_i` the attention CLS pays to patch i (both L2-normalised per image, as
       the official code).
    2. Local penalty: the original grid is cut into `window x window` windows; in each window the token with
       the highest score (the first by patch index among ties) has it amplified (`2s` if `s > 0`, else `s/2`),
       so that the first discards are spread over the image rather than concentrated in one region.
    """
    p2p = attention[:, 1:, 1:].mean(dim=-1)  # (batch, P)
    cls = attention[:, 0, 1:]  # (batch, P)
    score = (1 - cls_weight) * F.normalize(p2p, dim=-1) - cls_weight * F.normalize(cls, dim=-1)
    rows, cols = grid
    per_row = math.ceil(cols / window)
    win = (patch_index // cols) // window * per_row + (patch_index % cols) // window  # (batch, P)
    num_windows = math.ceil(rows / window) * per_row
    batch = score.shape[0]
    best = score.new_full((batch, num_windows), float("-inf")).scatter_reduce(1, win, score, "amax")
    at_best = score == best.gather(1, win)
    big = torch.full_like(patch_index, rows * cols)
    first = patch_index.new_full((batch, num_windows), rows * cols)
    first = first.scatter_reduce(1, win, torch.where(at_best, patch_index, big), "amin")
    top = patch_index == first.gather(1, win)  # (batch, P) one token per occupied window
    amplified = torch.where(score > 0, score * 2, score / 2)
    return torch.where(top, amplified, score)


def ficoco_v_reduce(
    x: torch.Tensor,
    size: torch.Tensor,
    attention: torch.Tensor,
    patch_index: torch.Tensor,
    r: int,
    grid: tuple[int, int],
    settings: FiCoCoVSettings,
) -> FiCoCoStep:
    """One FiCoCo-V step: remove r patch tokens per row (CLS, token 0, is never touched).

    Filter: the r patches with the highest `ficoco_redundancy` (stable order among ties).
    Correlate: filtered token i's targets are the kept patches j with `A_ij >= quantile_q(A_i, kept)` (and
    always its argmax), weighted `w_ij = A_ij / sum_targets A_ij`.
    Compress: weighted scatter-add of sizes and size-weighted tokens,
    `x_j <- (s_j x_j + sum_i w_ij s_i x_i) / (s_j + sum_i w_ij s_i)`, `s_j <- s_j + sum_i w_ij s_i`; kept
    tokens keep their places (tokens that received nothing stay bit-exact).
    """
    batch, length, width = x.shape
    score = ficoco_redundancy(attention, patch_index, grid, settings.cls_weight, settings.window)
    order = score.sort(dim=1, descending=True, stable=True).indices + 1  # (batch, P) token positions
    filtered = order[:, :r]  # (batch, r)
    kept_patches = order[:, r:].sort(dim=1).values  # (batch, M) ascending, M = P - r
    kept = torch.cat([torch.zeros_like(kept_patches[:, :1]), kept_patches], dim=1)  # (batch, 1 + M)

    rows_attn = attention.gather(1, filtered.unsqueeze(-1).expand(-1, -1, length))  # (batch, r, T)
    sim = rows_attn.gather(2, kept_patches.unsqueeze(1).expand(-1, r, -1))  # (batch, r, M)
    threshold = torch.quantile(sim, settings.targets_quantile, dim=-1, keepdim=True)  # (batch, r, 1)
    argmax = F.one_hot(sim.argmax(dim=-1), sim.shape[-1]).bool()  # (batch, r, M)
    weights = torch.where((sim >= threshold) | argmax, sim, torch.zeros_like(sim))
    weights = weights / weights.sum(dim=-1, keepdim=True)  # (batch, r, M)

    sizes = size.float()
    src_size = sizes.gather(1, filtered)  # (batch, r)
    contrib = weights * src_size.unsqueeze(-1)  # (batch, r, M) patches moved from i to j
    src = x.float().gather(1, filtered.unsqueeze(-1).expand(-1, -1, width))  # (batch, r, D)
    added = contrib.transpose(1, 2) @ src  # (batch, M, D) the scatter-add, as one product
    keep_x = x.float().gather(1, kept_patches.unsqueeze(-1).expand(-1, -1, width))  # (batch, M, D)
    keep_size = sizes.gather(1, kept_patches)  # (batch, M)
    new_size = keep_size + contrib.sum(dim=1)  # (batch, M)
    merged = (keep_x * keep_size.unsqueeze(-1) + added) / new_size.unsqueeze(-1)
    received = (contrib > 0).any(dim=1).unsqueeze(-1)  # (batch, M, 1)
    patches = torch.where(received, merged, keep_x).to(x.dtype)
    tokens = torch.cat([x[:, :1], patches], dim=1)  # (batch, 1 + M, D)
    return FiCoCoStep(tokens=tokens, sizes=torch.cat([sizes[:, :1], new_size], dim=1), kept_positions=kept)


class DeftLlavaFiCoCoVCompressor(TokenCompressor):
    """FiCoCo-V (Han et al., "Filter, Correlate, Compress", https://arxiv.org/abs/2411.17686) in the CLIP encoder.

    From encoder layer `start_layer` on, every layer (after its attention, before its MLP, where ToMe and the
    official code reduce) filters its r_i most redundant patch tokens, correlates each with the kept patches
    it attends to most, and compresses it into them by a weighted scatter-add (`ficoco_v_reduce`). r_i is
    `ficoco_v_schedule`, so the feature layer holds exactly K = `config.num_kept_tokens(N)` patch tokens.
    Kept tokens keep their place and their original patch (`kept_indices`), which gives their position id.

    Departures from the paper / official code:
    - schedule: exact (ToMe's rule: near-constant r, at most half a layer's patches, sum N - K) instead of a
      constant r = 42, so every budget K is met exactly; unreachable budgets raise at config time.
    - attention: recomputed in float32 from the layer's q/k projections (head average) so the encoder keeps
      SDPA; the official code reads the eager attention weights.
    - local penalty: windows are laid on the original patch grid and hold the current tokens by their
      original patch; partial windows at the edges count (the official code ignores them and keeps a global
      score buffer shared across images, not batch-safe). Only one token per window is amplified; ties go to
      the lowest patch index.
    - correlate: targets are kept PATCH tokens only (never CLS, which LLaVA drops); each filtered token has
      its own number of targets (quantile over the kept patches, at least one) instead of one shared top-k
      over all tokens; weights are the attention probabilities normalised over the targets (the official
      code applies a second softmax to the probabilities).
    - merged tokens carry fractional sizes, used in proportional attention as ToMe's integer ones.
    """

    name = "ficoco_v"
    needs_cls_token = True  # the filter score uses the CLS row of the attention
    stage = "vision_encoder"
    settings_class = FiCoCoVSettings

    def compress(self, image_features, context: CompressionContext) -> CompressionResult:
        raise TypeError(
            "ficoco_v reduces inside the vision encoder: the model calls `encode`, not the compressor"
        )

    # the encoder loop is ToMe's (`DeftLlavaToMeCompressor.encode`); FiCoCo-V changes the schedule and the step
    encode = DeftLlavaToMeCompressor.encode

    def schedule(self, num_patches: int, num_kept: int, layers_run: int) -> list[int]:
        return ficoco_v_schedule(num_patches, num_kept, layers_run, self.settings.start_layer)

    def reduce(self, layer, x, normed, mask, size, index, r, grid):
        """Filter-correlate-compress `r` tokens with the layer's recomputed (head-averaged) attention."""
        attention = head_mean_attention(layer, normed, mask)  # (batch, T, T)
        step = ficoco_v_reduce(x, size, attention, index[:, 1:] - 1, r, grid, self.settings)
        return step.tokens, step.sizes, step.kept_positions
