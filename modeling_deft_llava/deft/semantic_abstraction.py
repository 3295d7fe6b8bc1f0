"""Phase 1 of DeFT: the Semantic Abstraction Module (SAM), tokens of any modality -> shared semantic space."""

from __future__ import annotations

import torch
from torch import nn


class SemanticAbstraction(nn.Module):
    """2-layer MLP `z_i = A(x_i)` from the encoder's token width into the DeFT semantic space.

    Args:
        token_dim: width of the incoming tokens (e.g. 1024 for CLIP ViT-L, or the LLM width after the projector).
        semantic_dim: width of the shared semantic space (seed default 512).

    Differences from the paper: a parameter-free LayerNorm runs before the MLP, so that the score does not
    follow the raw token norm (background patches of CLIP-like encoders carry the largest norms).
    """

    def __init__(self, token_dim: int, semantic_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim, elementwise_affine=False)
        self.fc1 = nn.Linear(token_dim, semantic_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(semantic_dim, semantic_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_tokens, token_dim)` -> `(batch_size, num_tokens, semantic_dim)` in the weights' dtype
        (tokens of another floating dtype are cast: bfloat16 tokens into a float32 module are scored in float32)."""
        return self.fc2(self.act(self.fc1(self.norm(tokens.to(self.fc1.weight.dtype)))))
