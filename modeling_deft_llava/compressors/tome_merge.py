"""ToMe bipartite soft matching: merge the r most similar token pairs (https://arxiv.org/abs/2210.09461).

A pure function run between vision-encoder layers by `method_tome` (and, for its encoder loop, FiCoCo-V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TomeMergeResult:
    """Output of `tome_bipartite_merge`.

    Args:
        tokens: `(batch_size, num_tokens - r, hidden_size)` merged tokens, in the dtype of the input.
        sizes: `(batch_size, num_tokens - r)` float32, how many original tokens each token stands for.
        source: `(batch_size, num_tokens - r, num_original)` bool, `source[b, i, j]`: original token j was
            merged into token i. Rows partition the original tokens (ToMe's source map; enables unmerging).
        kept_positions: `(batch_size, num_tokens - r)` long: the input position of each output token (for a
            merged token, its destination); ascending with `order="positions"`.
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor
    kept_positions: torch.Tensor


def tome_bipartite_merge(
    x: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    *,
    metric: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    protect_first: bool = False,
    order: str = "positions",
) -> TomeMergeResult:
    """Merge r tokens per row into their most similar partner by ToMe's bipartite soft matching.

    ToMe (Bolya et al., ICLR 2023, https://arxiv.org/abs/2210.09461):

    1. Split the tokens alternately: set A = even positions, set B = odd positions.
    2. Score every A token by its largest cosine similarity (on `metric`, the layer's keys in the paper;
       the tokens themselves when None) to any B token, and remember that B token.
    3. The r best-scoring A tokens are merged into their B partners (several may share one partner) by a
       size-weighted average, `x_dst <- (s_dst x_dst + sum s_src x_src) / (s_dst + sum s_src)`; sizes add up.

    Args:
        x: `(batch_size, num_tokens, hidden_size)`.
        size: `(batch_size, num_tokens)` sizes of the tokens (None: all 1, the first merge).
        r: tokens to remove per row; clamped to `(num_tokens - protect_first) // 2`. `r <= 0` is a no-op.
        metric: `(batch_size, num_tokens, metric_dim)` similarity features, or None to use `x`.
        source: `(batch_size, num_tokens, num_original)` bool source map of earlier merges, or None
            (identity: every token is its own source).
        protect_first: never merge token 0 away (CLS), as ToMe's `class_token` flag.
        order: order of the output tokens. `"positions"`: every surviving token keeps its input order (a
            merged token takes its destination's place). `"released"`: the official `merge` output,
            `[unmerged A, B]`: the unmerged A tokens ascending when `protect_first` (the official code sorts
            them so CLS stays first), else in similarity order, then every B token in order. The order decides
            the next layer's A/B split, so from the second merge on the two orders merge different tokens.

    Returns:
        `TomeMergeResult`.

    Differences from the official code: `order="positions"` is not the official output order (see `order`).
    Ties in similarity go to the lower position, in score order to the earlier A token (the official code's
    `argsort` is not stable).
    """
    if order not in ("positions", "released"):
        raise ValueError(f"order must be 'positions' or 'released', got {order!r}")
    batch, num_tokens, _ = x.shape
    device = x.device
    if size is None:
        size = torch.ones(batch, num_tokens, device=device)
    if source is None:
        source = torch.eye(num_tokens, dtype=torch.bool, device=device).expand(batch, -1, -1)
    r = min(r, (num_tokens - int(protect_first)) // 2)
    if r <= 0:
        positions = torch.arange(num_tokens, device=device).expand(batch, -1)
        return TomeMergeResult(tokens=x, sizes=size.float(), source=source, kept_positions=positions)

    unit = F.normalize((x if metric is None else metric).float(), dim=-1)  # (batch, T, k)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (batch, |A|, |B|)
    if protect_first:
        scores[:, 0, :] = float("-inf")  # token 0 is A's first
    best, partner = scores.max(dim=2)  # (batch, |A|) each; max returns the first maximum
    order_a = best.sort(dim=1, descending=True, stable=True).indices  # (batch, |A|)
    src_a = order_a[:, :r]  # (batch, r) positions within A
    src = 2 * src_a  # (batch, r) input positions
    dst = 2 * partner.gather(1, src_a) + 1  # (batch, r) input positions of their B partners

    weights = size.float()  # (batch, T)
    weighted = x.float() * weights.unsqueeze(-1)  # (batch, T, D)
    width = x.shape[-1]
    summed = weighted.scatter_add(
        1,
        dst.unsqueeze(-1).expand(-1, -1, width),
        weighted.gather(1, src.unsqueeze(-1).expand(-1, -1, width)),
    )
    new_size = weights.scatter_add(1, dst, weights.gather(1, src))  # (batch, T)
    received = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter_(1, dst, True)
    # untouched tokens stay bit-exact; destinations get the size-weighted mean
    merged = torch.where(received.unsqueeze(-1), summed / new_size.unsqueeze(-1), x.float())  # (batch, T, D)

    src_map = source.float()  # (batch, T, N0)
    n0 = src_map.shape[-1]
    src_map = src_map.scatter_add(
        1, dst.unsqueeze(-1).expand(-1, -1, n0), src_map.gather(1, src.unsqueeze(-1).expand(-1, -1, n0))
    )

    if order == "released":
        unmerged_a = order_a[:, r:]  # (batch, |A| - r) in similarity order
        if protect_first:
            unmerged_a = unmerged_a.sort(dim=1).values  # CLS (A's first) stays first
        b_positions = torch.arange(1, num_tokens, 2, device=device).expand(batch, -1)  # (batch, |B|)
        kept = torch.cat([2 * unmerged_a, b_positions], dim=1)  # (batch, T - r) [unmerged A, B]
    else:
        removed = torch.zeros(batch, num_tokens, dtype=torch.uint8, device=device).scatter_(1, src, 1)
        kept = removed.sort(dim=1, stable=True).indices[:, : num_tokens - r]  # (batch, T - r) ascending
    return TomeMergeResult(
        tokens=merged.gather(1, kept.unsqueeze(-1).expand(-1, -1, width)).to(x.dtype),
        sizes=new_size.gather(1, kept),
        source=src_map.gather(1, kept.unsqueeze(-1).expand(-1, -1, n0)) > 0,
        kept_positions=kept,
    )
