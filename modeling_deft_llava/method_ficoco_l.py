"""FiCoCo-L: filter, correlate, compress inside the language model during prefill (https://arxiv.org/abs/2411.17686).

Runs the decoder layers as FastV does (`DeftLlavaFastVCompressor.run_language_model`: full sequence up to layer
K, then the text plus K visual tokens per image, with a shorter cache for the later layers); only the step at
layer K differs: the removed visual tokens are merged into the kept ones instead of being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .method_fastv import DeftLlavaFastVCompressor
from .token_compressor import check_range


@dataclass(frozen=True)
class FiCoCoLSettings:
    """Settings of FiCoCo-L.

    Args:
        ficoco_l_layer: K. Layers `0 .. K-1` see every token; at the input of layer K each image keeps its
            K_img best-scored visual tokens and the others are merged into them; layers `K ..` see the kept
            ones. Must be in `[1, num_hidden_layers - 1]` of the language model (checked when the config is
            built). Default 2, as FastV's setting for LLaVA-1.5.
        targets_quantile: a removed token merges into every kept token of its image whose cosine similarity
            to it is at least this quantile of its similarities to the kept tokens (token-adaptive number of
            targets, always at least the most similar one). 0.998 as FiCoCo-V's official code.
    """

    ficoco_l_layer: int = 2
    targets_quantile: float = 0.998

    def __post_init__(self):
        value = self.ficoco_l_layer
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ficoco_l_layer must be an int >= 1, got {value!r}")
        check_range("targets_quantile", self.targets_quantile, 0.0, 1.0)


def ficoco_l_merge(
    hidden: torch.Tensor, scores: torch.Tensor, visual_items: torch.Tensor, num_kept: int, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter, correlate and compress the visual tokens of every image (item) of `hidden` `(batch, seq, D)`.

    Filter: each item keeps its `num_kept` visual tokens of largest `scores` `(batch, seq)` (ties: the earlier
    token); the other R = N - K are removed.
    Correlate: removed token i's targets are the kept tokens j of the same item with cosine similarity
    `c_ij >= quantile_q(c_i)` (over the K kept tokens; always including its argmax), with weights
    `w_ij = softmax_j(c_ij)` over its targets (positive, summing to 1).
    Compress: weighted scatter-add, every kept token starting with size 1:
    `x_j <- (x_j + sum_i w_ij x_i) / (1 + sum_i w_ij)` (float32); a kept token that received nothing stays
    bit-exact. Items' tokens are found in row-major order and all items have the same count N.

    Returns:
        keep `(batch, seq)` bool (text and kept visual tokens) and the merged hidden states `(batch, seq, D)`.
    """
    batch, seq, width = hidden.shape
    flat_items = visual_items.flatten()  # (batch * seq,)
    where = (flat_items >= 0).nonzero().squeeze(1)  # (total,) ascending
    num_items = int(flat_items.max()) + 1
    per_item = where.view(num_items, -1)  # (items, N) flat positions
    n = per_item.shape[1]
    order = scores.flatten()[per_item].sort(dim=1, descending=True, stable=True).indices  # (items, N)
    kept_pos = per_item.gather(1, order[:, :num_kept])  # (items, K)
    removed_pos = per_item.gather(1, order[:, num_kept:])  # (items, R)
    keep = (flat_items < 0).clone()
    keep[kept_pos.flatten()] = True
    keep = keep.view(batch, seq)
    if num_kept >= n:
        return keep, hidden
    flat = hidden.reshape(batch * seq, width)
    kept_x, removed_x = flat[kept_pos].float(), flat[removed_pos].float()  # (items, K, D), (items, R, D)
    sim = F.normalize(removed_x, dim=-1) @ F.normalize(kept_x, dim=-1).transpose(1, 2)  # (items, R, K)
    threshold = torch.quantile(sim, quantile, dim=-1, keepdim=True)  # (items, R, 1)
    best = F.one_hot(sim.argmax(dim=-1), num_kept).bool()  # (items, R, K)
    targets = (sim >= threshold) | best
    weights = sim.masked_fill(~targets, float("-inf")).softmax(dim=-1)  # (items, R, K)
    added = weights.transpose(1, 2) @ removed_x  # (items, K, D) the scatter-add, as one product
    size = 1 + weights.sum(dim=1)  # (items, K)
    merged = (kept_x + added) / size.unsqueeze(-1)
    received = (weights > 0).any(dim=1).unsqueeze(-1)  # (items, K, 1)
    new_kept = torch.where(received, merged, kept_x).to(hidden.dtype)
    out = flat.clone()
    out[kept_pos.flatten()] = new_kept.reshape(-1, width)
    return keep, out.view(batch, seq, width)


class DeftLlavaFiCoCoLCompressor(DeftLlavaFastVCompressor):
    """FiCoCo-L (Han et al., "Filter, Correlate, Compress", https://arxiv.org/abs/2411.17686) in the language model.

    Layers `0 .. K-1` (K = `ficoco_l_layer`) run on every token. At the input of layer K, for every image:
    filter: the attention the LAST prompt token pays at layer K-1 (head average, recomputed from q/k with RoPE,
    as FastV) ranks its N visual tokens and it keeps K_img = `num_kept_tokens(N, deft_retention_ratio)`;
    correlate: each removed token picks the kept tokens of the same image most similar to it (cosine
    similarity of the hidden states entering layer K, token-adaptive quantile `targets_quantile`, at least
    one); compress: it is merged into them by a weighted scatter-add (`ficoco_l_merge`). Layers `K ..` run on
    the text plus the K_img merged tokens per image, at their original position ids, with a shorter KV cache;
    decoding continues as in FastV (the layer gather index travels in `deft_generation_state`). Every choice
    uses the prompt only (`deft_prompt_length`), so a cached generate equals a full recompute.

    Departures from the paper: the filter score is the last prompt token's attention alone (the paper
    combines the attention of the text tokens with a visual-redundancy term); correlation is the cosine
    similarity of hidden states (the paper uses attention-derived correlations), with softmax weights over the
    targets; the merge happens once, at the input of layer K (not spread over layers); merged tokens carry no
    size in the later layers' attention (no proportional attention). Each image keeps exactly K_img tokens
    and a batch is handled row by row image by image (the official code assumes one image, batch 1).
    """

    name = "ficoco_l"
    stage = "language_model"
    settings_class = FiCoCoLSettings
    layer_setting = "ficoco_l_layer"

    def compress(self, image_features, context):
        raise TypeError("ficoco_l merges inside the language model: the model calls `run_language_model`")

    def reduce_visual(
        self, hidden: torch.Tensor, scores: torch.Tensor, visual_items: torch.Tensor, num_kept: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each image's `num_kept` best-scored visual tokens and merge the others into them."""
        return ficoco_l_merge(hidden, scores, visual_items, num_kept, self.settings.targets_quantile)
