"""FGCS conditioning: what the saliency MLP reads besides the token, its place in the grid and the question.

Two optional inputs of the saliency scorer (`DeftSettings.deft_position_aware`, `deft_question_aware`):

- `GridPositionEncoding`: each visual token's frame, row and column, as sinusoidal features of the coordinates
  normalised to (0, 1) (the centre of each cell; an image is one frame, at 0.5), projected into the semantic
  space and added to SAM's token before the saliency MLP. Normalised coordinates make one set of weights fit
  every grid size and frame count.
- `QuestionEncoder`: the question's tokens, as the language model's own input embeddings `e_t` (no second
  text tower, as CDPruner reads its instruction), become a FiLM modulation `(gamma, beta)` of the saliency MLP's
  first hidden layer: `h_i <- h_i * (1 + gamma) + beta`. Each question token is read with the token before it
  (`[e_t ; e_{t-1}]`, so "row 2 column 3" differs from "row 3 column 2"), projected by a 2-layer MLP, and
  pooled by attention with `num_queries` learned queries.

Both output layers start at zero, so a module built with either option scores exactly as the seed's until it is
trained, and a checkpoint saved without them loads unchanged (`DeftLlavaPreTrainedModel._init_weights` keeps
the zeros: `_deft_zero_init`).

Differences from the seed README: the seed's saliency `s_sem_i = MLP(z_i)` reads the token alone; these inputs
are this project's additions, measured in docs/results.md ("DeFT ablation").
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from .group_scorer import grid_views

NUM_FREQUENCIES = (
    4  # sin and cos of pi * 2^f * coordinate, f = 0..3, for frames, rows and columns: 24 features
)
NUM_AXES = 3
NUM_QUERIES = 4  # learned attention queries that pool the question


@lru_cache(maxsize=64)
def _grid_features(frames: int, rows: int, cols: int, num_frequencies: int) -> torch.Tensor:
    """`(frames * rows * cols, 2 * NUM_AXES * num_frequencies)` sinusoidal features of the normalised cell
    centres, frame by frame, row-major inside a frame."""
    t = (torch.arange(frames, dtype=torch.float64) + 0.5) / frames  # (frames,)
    r = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows  # (rows,)
    c = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols  # (cols,)
    tt = t.view(-1, 1, 1).expand(frames, rows, cols).reshape(-1)  # (N,)
    rr = r.view(1, -1, 1).expand(frames, rows, cols).reshape(-1)  # (N,)
    cc = c.view(1, 1, -1).expand(frames, rows, cols).reshape(-1)  # (N,)
    angles = [math.pi * 2**f * x for f in range(num_frequencies) for x in (tt, rr, cc)]
    return torch.stack([fn(a) for a in angles for fn in (torch.sin, torch.cos)], dim=-1).float()


def grid_position_features(
    spatial_shape: tuple[int, int], num_tokens: int, device, num_frequencies: int = NUM_FREQUENCIES
) -> torch.Tensor:
    """`(num_tokens, 2 * NUM_AXES * num_frequencies)` float32 features of each token's frame and cell in a
    `(rows, cols)` grid; `num_tokens` is a whole number of grids (the frames of a video).

    Raises:
        ValueError: `num_tokens` is not a multiple of `rows * cols`.
    """
    views = grid_views(spatial_shape)
    if views is not None:  # an image of several views: each view's cells normalised in that view
        return torch.cat([grid_position_features(v, v[0] * v[1], device, num_frequencies) for v in views])
    rows, cols = spatial_shape
    if num_tokens % (rows * cols) != 0:
        raise ValueError(
            f"{num_tokens} tokens are not a whole number of {rows}x{cols} grids: cannot place them for "
            "deft_position_aware"
        )
    return _grid_features(num_tokens // (rows * cols), rows, cols, num_frequencies).to(device)  # (N, F)


class GridPositionEncoding(nn.Module):
    """`(rows, cols)` grid (and frames) -> `(num_tokens, semantic_dim)` position vectors to add to SAM's tokens.

    Args:
        semantic_dim: width of the semantic tokens.
    """

    def __init__(self, semantic_dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * NUM_AXES * NUM_FREQUENCIES, semantic_dim)
        self.proj._deft_zero_init = True
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, spatial_shape: tuple[int, int], num_tokens: int) -> torch.Tensor:
        features = grid_position_features(spatial_shape, num_tokens, self.proj.weight.device)
        return self.proj(features.to(self.proj.weight.dtype))  # (num_tokens, semantic_dim)


class QuestionEncoder(nn.Module):
    """Question token embeddings -> FiLM parameters of the saliency MLP's first hidden layer.

    Args:
        token_dim: width of the question embeddings (the language model's hidden size).
        semantic_dim: width of the projected question tokens.
        hidden_dim: width of the saliency MLP's hidden layer (the FiLM parameters each have this width).
    """

    def __init__(self, token_dim: int, semantic_dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim, elementwise_affine=False)
        self.fc1 = nn.Linear(2 * token_dim, semantic_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(semantic_dim, semantic_dim)
        self.queries = nn.Parameter(torch.randn(NUM_QUERIES, semantic_dim) / math.sqrt(semantic_dim))
        self.film = nn.Linear(NUM_QUERIES * semantic_dim, 2 * hidden_dim)
        self.film._deft_zero_init = True
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(
        self, question_embeds: torch.Tensor, question_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`question_embeds` `(batch, T, token_dim)`, `question_mask` `(batch, T)` bool (True on the question's
        tokens) -> `gamma`, `beta`, each `(batch, hidden_dim)`; a row without question tokens gets zeros (the
        seed's saliency)."""
        embeds = self.norm(question_embeds.to(self.fc1.weight.dtype))  # (batch, T, D)
        previous = torch.cat([torch.zeros_like(embeds[:, :1]), embeds[:, :-1]], dim=1)  # (batch, T, D)
        previous = (
            previous
            * torch.cat(  # the token before a question's first token is not part of it
                [question_mask.new_zeros(question_mask.shape[0], 1), question_mask[:, :-1]], dim=1
            )
            .unsqueeze(-1)
            .to(previous.dtype)
        )
        tokens = self.fc2(self.act(self.fc1(torch.cat([embeds, previous], dim=-1))))  # (batch, T, S)
        logits = torch.einsum("qs,bts->bqt", self.queries.to(tokens.dtype), tokens) / math.sqrt(
            tokens.shape[-1]
        )
        has_question = question_mask.any(1)  # (batch,)
        # an empty row attends everywhere (no NaN from a softmax over nothing) and its weights are zeroed
        attend = question_mask | ~has_question.unsqueeze(1)  # (batch, T)
        weights = logits.masked_fill(~attend.unsqueeze(1), float("-inf")).softmax(-1)  # (batch, Q, T)
        weights = weights * has_question.view(-1, 1, 1).to(weights.dtype)
        pooled = torch.einsum("bqt,bts->bqs", weights, tokens).flatten(1)  # (batch, Q * S)
        gamma, beta = self.film(pooled).chunk(2, dim=-1)  # (batch, H) each
        keep = has_question.unsqueeze(1).to(gamma.dtype)
        return gamma * keep, beta * keep


__all__ = ["GridPositionEncoding", "QuestionEncoder", "grid_position_features"]
