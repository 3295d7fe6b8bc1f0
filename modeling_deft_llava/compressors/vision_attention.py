"""Attention statistics of a CLIP vision layer, recomputed from its input so the encoder can run with SDPA.

Methods such as VisionZip (https://arxiv.org/abs/2412.04467) rank patches by the attention the CLS query pays
them. Fused attention kernels (SDPA, FlashAttention) never materialise those weights, so instead of forcing
eager attention on the whole encoder we recompute the one row we need: `(1 + N)` dot products per head,
negligible next to the layer itself.
"""

from __future__ import annotations

import torch
from torch import nn


def _heads(layer: nn.Module, states: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """`(batch, L, width)` -> `(batch, heads, L, head_dim)` projected by `proj`."""
    attn = layer.self_attn
    batch, length, _ = states.shape
    return proj(states).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)


def cls_attention(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the CLS query over the patch keys of one CLIP encoder layer.

    Args:
        layer: a `transformers` `CLIPEncoderLayer` (`layer_norm1`, `self_attn.q_proj/k_proj`,
            `self_attn.num_heads/head_dim/scale`).
        hidden_states: `(batch_size, 1 + num_patches, width)` the hidden states that ENTER `layer` (the
            encoder's `hidden_states[i]` for layer i); index 0 is CLS.

    Returns:
        `(batch_size, num_patches)` float32: `softmax(q_cls . k / sqrt(head_dim))` over all `1 + N` keys, as
        the layer computes it, averaged over heads, with the CLS column dropped (rows sum to less than 1).
    """
    normed = layer.layer_norm1(hidden_states)  # (batch, 1 + N, width)
    attn = layer.self_attn
    query = _heads(layer, normed[:, :1], attn.q_proj).float()  # (batch, heads, 1, head_dim)
    keys = _heads(layer, normed, attn.k_proj).float()  # (batch, heads, 1 + N, head_dim)
    logits = (query @ keys.transpose(-1, -2)) * attn.scale  # (batch, heads, 1, 1 + N)
    weights = logits.softmax(dim=-1).mean(dim=1)  # (batch, 1, 1 + N)
    return weights[:, 0, 1:]  # (batch, N)


def patch_keys(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Head-averaged keys of the patches, VisionZip's similarity metric.

    Args:
        layer, hidden_states: as `cls_attention`.

    Returns:
        `(batch_size, num_patches, head_dim)` the layer's keys (after `layer_norm1` and `k_proj`) averaged
        over heads, CLS dropped, in the dtype of `hidden_states`.
    """
    keys = _heads(
        layer, layer.layer_norm1(hidden_states), layer.self_attn.k_proj
    )  # (batch, heads, 1 + N, hd)
    return keys.mean(dim=1)[:, 1:]  # (batch, N, head_dim)
