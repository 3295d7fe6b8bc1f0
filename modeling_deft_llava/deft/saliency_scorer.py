"""FGCS component 1: the learned semantic saliency `s_sem`, a 3-layer MLP over the semantic tokens."""

from __future__ import annotations

import torch
from torch import nn


class SaliencyScorer(nn.Module):
    """`s_sem_i = MLP_3(z_i)`: one scalar per token.

    The output layer has no bias: `s_sem` is min-max normalised per sample before it is used, so a constant added
    to every token's score cancels and such a bias could never receive a gradient. Checkpoints written before this
    change hold `mlp.4.bias`; it is dropped on load (it never changed any output).

    Args:
        semantic_dim: width of the semantic tokens `z`.
        hidden_dim: width of the two hidden layers.
    """

    # the output bias of earlier checkpoints: cancelled by the per-sample normalisation, ignored on load
    LEGACY_KEYS = ("mlp.4.bias",)

    def __init__(self, semantic_dim: int, hidden_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(semantic_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1, bias=False),
        )

    def forward(self, semantic_tokens: torch.Tensor, film: tuple | None = None) -> torch.Tensor:
        """`(batch_size, num_tokens, semantic_dim)` -> raw scores `(batch_size, num_tokens)`.

        `film`: optional `(gamma, beta)`, each `(batch_size, hidden_dim)`, applied to the first hidden layer
        before its activation, `h * (1 + gamma) + beta` (`QuestionEncoder`; zeros leave the seed's MLP)."""
        hidden = self.mlp[0](semantic_tokens)  # (batch, N, hidden)
        if film is not None:
            gamma, beta = film
            hidden = hidden * (1 + gamma.unsqueeze(1).to(hidden.dtype)) + beta.unsqueeze(1).to(hidden.dtype)
        return self.mlp[1:](hidden).squeeze(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in self.LEGACY_KEYS:  # `load_state_dict(strict=True)` of an older DeFTModule still works
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
