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
from .token_compressor import (
    check_choice,
    check_range,
)

ATTENTION_SCORES = ("logits", "probabilities")


@dataclass(frozen=True)
class FiCoCoVSettings:
    """Settings of FiCoCo-V. The defaults reproduce the official code (kawhiiiileo/FiCoCo, LLaVA-1.5 setting).

    Args:
        start_layer: 0-based index of the first encoder layer that reduces tokens. The official code reduces in
            layer i when `i > control_encoding_layer` (11), so its first reducing layer is 12, the default.
            Layers before it see every token.
        cls_weight: beta, weight of the CLS attention in the redundancy score
            `(1 - beta) * patch_to_patch - beta * cls` (0.35 in the official code).
        window: side of the square windows of the local penalty (2: 2x2 windows, as the official code).
        targets_quantile: a filtered token merges into every kept patch whose attention from it is at least
            this quantile of its attention to the kept patches (token-adaptive number of targets; always at
            least its most-attended kept patch). 0.998 in the official code.
        attention_scores: what the filter reads: `"logits"` (official): the head mean of the scaled q.k
            logits before the softmax; the correlate weights are then the softmax of that head-mean row.
            `"probabilities"`: the head mean of the per-head softmax probabilities, for both.
        size_weighted_merge: weight every token of a merge by the number of patches it already stands for
            (ToMe's size-weighted average). False (official): the official code never carries sizes from one
            layer to the next, so each layer merges as if every token stood for one patch.
        proportional_attention: add `log(size)` of every key to the attention logits once tokens are merged
            (ToMe's proportional attention); passed as an additive mask, so SDPA stays on. False (official):
            the official code discards the sizes, so its attention never sees them.
    """

    start_layer: int = 12
    cls_weight: float = 0.35
    window: int = 2
    targets_quantile: float = 0.998
    attention_scores: str = "logits"
    size_weighted_merge: bool = False
    proportional_attention: bool = False

    def __post_init__(self):
        for name in ("start_layer", "window"):
            value = getattr(self, name)
            low = 0 if name == "start_layer" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        check_range("cls_weight", self.cls_weight, 0.0, 1.0)
        check_range("targets_quantile", self.targets_quantile, 0.0, 1.0)
        check_choice("attention_scores", self.attention_scores, ATTENTION_SCORES)
        for name in ("size_weighted_merge", "proportional_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


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


def attention_logits(layer: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """`(batch, heads, T, T)` float32 scaled q.k logits of a CLIP layer, before any mask and the softmax.

    Recomputed from the layer's own q/k projections of its input `normed` (`layer_norm1(x)`), so the layer
    itself can keep running with SDPA.
    """
    attn = layer.self_attn
    batch, length, _ = normed.shape
    q = attn.q_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    k = attn.k_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2).float()
    return q @ k.transpose(2, 3) * attn.scale  # (batch, heads, T, T)


def head_mean_scores(logits: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """`(batch, T, T)` the attention scores FiCoCo-V's filter reads, from `(batch, heads, T, T)` logits.

    `"logits"` (official): the head mean of the logits themselves, before the softmax and without `mask`
    (the official code takes it before adding anything to the logits). `"probabilities"`: the head mean of
    `softmax(logits + mask)`, the weights the layer attends with. The two can rank keys differently: for
    logits `[[0, 10], [1.5, 0], [1.5, 0]]` (3 heads, 2 keys) the mean logit ranks key 1 first, the mean
    probability key 0.
    """
    if kind == "logits":
        return logits.mean(dim=1)
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

    `attention`: `(batch, 1 + P, 1 + P)` head-averaged attention scores, CLS first (`head_mean_scores`:
    logits or probabilities); `patch_index`: `(batch, P)` original patch of every current token (raster order
    on `grid`).

    1. `s_i = (1 - beta) * p2p_i / ||p2p|| - beta * cls_i / ||cls||`, where `p2p_i` is the mean score patch
       i gives the patches and `cls_i` the score CLS gives patch i (both L2-normalised per image, as the
       official code).
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


def ficoco_v_correlate(
    probs: torch.Tensor, filtered: torch.Tensor, kept_patches: torch.Tensor, quantile: float
) -> torch.Tensor:
    """Merge weights `(batch, r, M)` of every filtered token over the kept patches (rows sum to 1).

    `probs`: `(batch, T, T)` attention probabilities; `filtered` `(batch, r)` and `kept_patches` `(batch, M)`
    token positions. Filtered token i's targets are the kept patches j with `P_ij >= quantile_q(P_i, kept)`
    (and always its argmax); `w_ij = P_ij / sum_targets P_ik`.
    """
    length = probs.shape[-1]
    r = filtered.shape[1]
    rows = probs.gather(1, filtered.unsqueeze(-1).expand(-1, -1, length))  # (batch, r, T)
    sim = rows.gather(2, kept_patches.unsqueeze(1).expand(-1, r, -1))  # (batch, r, M)
    threshold = torch.quantile(sim, quantile, dim=-1, keepdim=True)  # (batch, r, 1)
    argmax = F.one_hot(sim.argmax(dim=-1), sim.shape[-1]).bool()  # (batch, r, M)
    weights = torch.where((sim >= threshold) | argmax, sim, torch.zeros_like(sim))
    return weights / weights.sum(dim=-1, keepdim=True)  # (batch, r, M)


def ficoco_v_compress(
    x: torch.Tensor,
    size: torch.Tensor,
    filtered: torch.Tensor,
    kept_patches: torch.Tensor,
    weights: torch.Tensor,
    size_weighted: bool,
) -> FiCoCoStep:
    """Fold the filtered tokens into the kept patches they correlate with; CLS (token 0) stays first, untouched.

    `x` `(batch, T, D)`, `size` `(batch, T)`; `filtered` `(batch, r)`, `kept_patches` `(batch, M)` ascending
    token positions; `weights` `(batch, r, M)`. Weighted scatter-add into each kept patch j:
    `x_j <- (m_j x_j + sum_i w_ij m_i x_i) / (m_j + sum_i w_ij m_i)`, with masses `m = size` when
    `size_weighted`, else `m = 1` (the official code). Sizes add up either way:
    `s_j <- s_j + sum_i w_ij s_i`. Kept tokens keep their places; those that received nothing stay bit-exact.
    Example (1-D tokens, CLS first): `x = [0, 10, 20, 30, 40]`, token 2 merged into token 3 with weight 1:
    `[0, 10, 25, 40]` (the official code, whose kept rows are in score order `[4, 3, 1, 0]` and which adds
    token 2 at row 3 of that list, returns `[40, 30, 10, 10]`).
    """
    width = x.shape[-1]
    sizes = size.float()
    mass = sizes if size_weighted else torch.ones_like(sizes)  # (batch, T)
    src_mass = weights * mass.gather(1, filtered).unsqueeze(-1)  # (batch, r, M)
    src = x.float().gather(1, filtered.unsqueeze(-1).expand(-1, -1, width))  # (batch, r, D)
    added = src_mass.transpose(1, 2) @ src  # (batch, M, D) the scatter-add, as one product
    keep_x = x.float().gather(1, kept_patches.unsqueeze(-1).expand(-1, -1, width))  # (batch, M, D)
    keep_mass = mass.gather(1, kept_patches)  # (batch, M)
    merged = (keep_x * keep_mass.unsqueeze(-1) + added) / (keep_mass + src_mass.sum(dim=1)).unsqueeze(-1)
    received = (weights > 0).any(dim=1).unsqueeze(-1)  # (batch, M, 1)
    patches = torch.where(received, merged, keep_x).to(x.dtype)
    new_size = sizes.gather(1, kept_patches) + (weights * sizes.gather(1, filtered).unsqueeze(-1)).sum(dim=1)
    kept = torch.cat([torch.zeros_like(kept_patches[:, :1]), kept_patches], dim=1)  # (batch, 1 + M)
    return FiCoCoStep(
        tokens=torch.cat([x[:, :1], patches], dim=1),  # (batch, 1 + M, D)
        sizes=torch.cat([sizes[:, :1], new_size], dim=1),  # (batch, 1 + M)
        kept_positions=kept,
    )


def ficoco_v_reduce(
    x: torch.Tensor,
    size: torch.Tensor,
    scores: torch.Tensor,
    probs: torch.Tensor,
    patch_index: torch.Tensor,
    r: int,
    grid: tuple[int, int],
    settings: FiCoCoVSettings,
) -> FiCoCoStep:
    """One FiCoCo-V step: remove r patch tokens per row (CLS, token 0, is never touched).

    Filter: the r patches with the highest `ficoco_redundancy` of `scores` `(batch, T, T)` (stable order
    among ties). Correlate: `ficoco_v_correlate` on `probs` `(batch, T, T)`. Compress: `ficoco_v_compress`.
    """
    redundancy = ficoco_redundancy(scores, patch_index, grid, settings.cls_weight, settings.window)
    order = redundancy.sort(dim=1, descending=True, stable=True).indices + 1  # (batch, P) token positions
    filtered = order[:, :r]  # (batch, r)
    kept_patches = order[:, r:].sort(dim=1).values  # (batch, M) ascending, M = P - r
    weights = ficoco_v_correlate(probs, filtered, kept_patches, settings.targets_quantile)
    return ficoco_v_compress(x, size, filtered, kept_patches, weights, settings.size_weighted_merge)


class DeftLlavaFiCoCoVCompressor(DeftLlavaToMeCompressor):
    """FiCoCo-V (Han et al., "Filter, Correlate, Compress", https://arxiv.org/abs/2411.17686) in the CLIP encoder.

    From encoder layer `start_layer` on, every layer (after its attention, before its MLP, where ToMe and the
    official code reduce) filters its r_i most redundant patch tokens, correlates each with the kept patches
    it attends to most, and compresses it into them by a weighted scatter-add (`ficoco_v_reduce`). r_i is
    `ficoco_v_schedule`, so the feature layer holds exactly K = `config.num_kept_tokens(N)` patch tokens.
    Kept tokens keep their place and their original patch (`kept_indices`), which gives their position id.
    The defaults follow the official code (kawhiiiileo/FiCoCo, `clip_encoder.py` and `FiCoCo_V.py`):
    start at layer 12, filter on the head mean of the q.k logits, no size weighting, no proportional attention.

    Differences from the official code:
    - official bugs fixed (no setting restores them):
      - compress: the official code gathers the kept tokens in score order, then scatter-adds each filtered
        token at its target's ORIGINAL index into that score-ordered list, so merged information lands on
        whichever token occupies that row, in general not the target. Here it is added to the intended token. Example: tokens `[0, 10, 20, 30, 40]` (0 is CLS), token 2 merged into 3,
        kept order `[4, 3, 1, 0]`: official `[40, 30, 10, 10]`; here token 3 becomes 25
        (`ficoco_v_compress`).
      - order: the official code appends CLS (score +inf) last, so from the first reducing layer on row 0 is
        a patch: its later filters read that patch as CLS, and LLaVA's `[:, 1:]` drops a patch and keeps CLS
        as a visual token. Here CLS stays first and kept tokens keep their order.
      - local penalty: the official code keeps one module-level score buffer of 576 entries, shared by every
        layer and every image (never reset), and indexes the current tokens with its window positions; it
        assumes one image, a 24x24 grid, and that no token moved. Here windows are laid on the original patch
        grid and hold the current tokens by their original patch, per image; partial windows at the edges
        count (the official code ignores them). One token per window is amplified; ties go to the lowest
        patch index.
    - deliberate departures:
      - schedule: exact (ToMe's rule: near-constant r, at most half a layer's patches, sum N - K) instead of
        a constant r = 42, so every budget K is met exactly; unreachable budgets raise at config time. The
        official setting, 42 tokens in each of the 11 layers 12..22, is `ficoco_v_schedule(576, 114, 23, 12)`.
      - attention: recomputed in float32 from the layer's q/k projections (`attention_logits`) so the
        encoder keeps SDPA; the official code computes the layer's attention eagerly and takes the mean of
        its logits over heads (and over the batch: it assumes one image).
      - correlate: targets are kept PATCH tokens only (the official code ranks all tokens of the layer: CLS,
        other filtered tokens and the token itself included); each filtered token has its own number of
        targets (`sim >= quantile` over the kept patches, at least one) instead of one shared top-k (the
        largest count of logits strictly above the quantile over all tokens, taken by every filtered token).
        The weights are the same rule: the softmax of the head-mean logits, normalised over the targets.
      - settings beyond the official code: `attention_scores="probabilities"`, `size_weighted_merge`,
        `proportional_attention` (ToMe's size tracking, on which FiCoCo's code is built but which it drops).
    """

    name = "ficoco_v"
    needs_cls_token = True  # the filter score uses the CLS row of the attention
    settings_class = FiCoCoVSettings

    # the encoder loop and the model's hook are ToMe's (`DeftLlavaToMeCompressor.encode`, `encode_images`);
    # FiCoCo-V changes the schedule and the step

    @classmethod
    def check_layers(cls, settings, layer: int, run: int) -> None:
        if not 0 <= settings.start_layer < run:
            raise ValueError(
                f"ficoco_v start_layer must be in [0, {run - 1}]: vision_feature_layer={layer} is the output of "
                f"encoder layer {run - 1}, got {settings.start_layer}"
            )

    def schedule(self, num_patches: int, num_kept: int, layers_run: int) -> list[int]:
        return ficoco_v_schedule(num_patches, num_kept, layers_run, self.settings.start_layer)

    def reduce(self, layer, x, normed, mask, size, index, r, grid):
        """Filter-correlate-compress `r` tokens with the layer's recomputed attention."""
        kind = self.settings.attention_scores
        scores = head_mean_scores(attention_logits(layer, normed), mask, kind)  # (batch, T, T)
        # the official correlate weights are the softmax of the head-mean logits
        probs = scores.softmax(dim=-1) if kind == "logits" else scores
        step = ficoco_v_reduce(x, size, scores, probs, index[:, 1:] - 1, r, grid, self.settings)
        return step.tokens, step.sizes, step.kept_positions
