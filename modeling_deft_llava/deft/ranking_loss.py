"""FGCS training: how a score learns from the feedback score `s_fb` (`DeftSettings.deft_ranking_loss`).

- `"mse"` (the seed): per-token squared error between the min-max normalised score and the normalised `s_fb`.
  A regression objective: every token's value counts the same, although only the top k are kept.
- `"listnet"` (Cao et al., "Learning to Rank: From Pairwise Approach to Listwise Approach", ICML 2007): the
  cross-entropy between `softmax(s~_fb / T)` and `softmax(s~ / T)` over each sample's valid tokens, `s~` the
  min-max normalised scores and `T` = `deft_ranking_temperature`. Tokens the oracle ranks high carry most of
  the target mass, so the loss is spent where the top-k decision is made.
"""

from __future__ import annotations

import torch

from ..configuration.deft_settings import RANKING_LOSSES
from .score_mixer import normalize_per_sample


def ranking_loss(
    scores: torch.Tensor,
    target: torch.Tensor,
    token_mask: torch.Tensor | None,
    kind: str = "mse",
    temperature: float = 0.1,
) -> torch.Tensor:
    """Scalar loss pulling the ranking of `scores` `(batch, N)` towards that of `target` `(batch, N)` (already
    normalised to [0, 1] per sample, e.g. `s~_fb`); `token_mask` `(batch, N)` bool marks valid tokens (None: all).

    Raises:
        ValueError: `kind` is not one of `RANKING_LOSSES`.
    """
    if kind not in RANKING_LOSSES:
        raise ValueError(f"ranking loss must be one of {RANKING_LOSSES}, got {kind!r}")
    normalized = normalize_per_sample(scores, token_mask)  # (batch, N) in [0, 1]
    if kind == "mse":
        error = (normalized - target).pow(2)
        return error[token_mask].mean() if token_mask is not None else error.mean()
    logits = normalized / temperature
    goal = target.float() / temperature
    if token_mask is not None:
        logits = logits.masked_fill(~token_mask, float("-inf"))
        goal = goal.masked_fill(~token_mask, float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)
    q = torch.softmax(goal, dim=1)
    per_token = -(q * log_p)
    if token_mask is not None:
        per_token = per_token.masked_fill(~token_mask, 0.0)  # 0 * -inf on padding
    return per_token.sum(1).mean()


__all__ = ["ranking_loss"]
