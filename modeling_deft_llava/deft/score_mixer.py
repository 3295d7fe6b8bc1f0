"""FGCS mixing: per-sample normalisation of each score component and the learned mixture `beta`."""

from __future__ import annotations

import torch
from torch import nn

from ..configuration.deft_settings import SCORE_COMPONENTS

COMPONENTS = SCORE_COMPONENTS


def normalize_per_sample(scores: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Min-max normalise `(batch, N)` scores to [0, 1] over each sample's valid tokens (padding -> 0).

    A sample whose valid scores are all equal maps to 0.5 everywhere (no preference). Padding may hold anything,
    -inf included (the mixed score): it is replaced by 0 before any arithmetic, because the gradient of
    `(score - low) / span` at a -inf score is `0 * inf = NaN` even where the result is masked out afterwards,
    and it would reach every weight behind `span`."""
    scores = scores.float()
    if token_mask is not None:
        scores = torch.where(token_mask, scores, torch.zeros_like(scores))
    if token_mask is None:
        low = scores.amin(dim=1, keepdim=True)
        high = scores.amax(dim=1, keepdim=True)
    else:
        low = scores.masked_fill(~token_mask, float("inf")).amin(dim=1, keepdim=True)
        high = scores.masked_fill(~token_mask, float("-inf")).amax(dim=1, keepdim=True)
    span = high - low
    flat = span <= torch.finfo(scores.dtype).eps
    normalized = torch.where(flat, torch.full_like(scores, 0.5), (scores - low) / span.clamp_min(1e-12))
    if token_mask is not None:
        normalized = normalized.masked_fill(~token_mask, 0.0)
    return normalized


class ScoreMixer(nn.Module):
    """`s_i = sum_c beta_c * s~_c,i` with `beta = softmax(mixture_logits)` over the components present.

    A component that is absent in a call (the feedback score outside training) is removed and the softmax
    is taken over the others, so the weights of the present components always sum to 1.
    """

    def __init__(self):
        super().__init__()
        self.mixture_logits = nn.Parameter(torch.zeros(len(COMPONENTS)))

    def weights(self, present: tuple[str, ...] = COMPONENTS) -> dict[str, torch.Tensor]:
        """`beta` over the `present` components, float32 whatever the parameter's dtype.

        Raises:
            ValueError: a present component's logit is not finite (e.g. a large logit cast to float16).
        """
        idx = [COMPONENTS.index(name) for name in present]
        logits = self.mixture_logits[idx].float()
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(
                f"DeFT mixture_logits for {list(present)} are not finite ({logits.tolist()}, stored as "
                f"{self.mixture_logits.dtype}): keep the score mixer in float32 (from_pretrained(dtype=...) "
                "does) or re-train the mixture"
            )
        beta = torch.softmax(logits, dim=0)
        return {name: beta[i] for i, name in enumerate(present)}

    def forward(
        self, components: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`components`: name -> normalised `(batch, N)` scores or None. Returns mixed scores and the weights."""
        present = tuple(name for name in COMPONENTS if components.get(name) is not None)
        beta = self.weights(present)
        mixed = sum(beta[name] * components[name] for name in present)
        return mixed, beta
