"""FGCS component 1: the learned semantic saliency `s_sem`, a 3-layer MLP over the semantic tokens."""

from __future__ import annotations

import torch
from torch import nn


class SaliencyScorer(nn.Module):
    """`s_sem_i = MLP_3(z_i)`: one scalar per token.

    Args:
        semantic_dim: width of the semantic tokens `z`.
        hidden_dim: width of the two hidden layers.
    """

    def __init__(self, semantic_dim: int, hidden_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(semantic_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, semantic_tokens: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_tokens, semantic_dim)` -> raw scores `(batch_size, num_tokens)`."""
        return self.mlp(semantic_tokens).squeeze(-1)
