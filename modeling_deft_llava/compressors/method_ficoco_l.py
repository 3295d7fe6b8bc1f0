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
from .token_compressor import check_choice, check_range

COMPRESS_RULES = ("average", "sum")


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
            targets, always at least the most similar one). 0.998 as the official code.
        compress_rule: how a kept token j takes in the removed tokens i merged into it, with weights w_ij:
            `"average"` (default, the paper): `x_j <- (x_j + sum_i w_ij x_i) / (1 + sum_i w_ij)`, the same
            compression as FiCoCo-V (the paper: "the compression modules of FiCoCo-V and FiCoCo-L are
            identical"; FiCoCo-V's official code divides by this size). `"sum"` (the released
            `FiCoCo_L.py`): `x_j <- x_j + sum_i w_ij x_i`; its `merge_ficoco_l` computes the same size and
            drops it.
    """

    ficoco_l_layer: int = 2
    targets_quantile: float = 0.998
    compress_rule: str = "average"

    def __post_init__(self):
        value = self.ficoco_l_layer
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ficoco_l_layer must be an int >= 1, got {value!r}")
        check_range("targets_quantile", self.targets_quantile, 0.0, 1.0)
        check_choice("compress_rule", self.compress_rule, COMPRESS_RULES)


def ficoco_l_merge(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    visual_items: torch.Tensor,
    num_kept: int,
    quantile: float,
    compress_rule: str = "average",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter, correlate and compress the visual tokens of every image (item) of `hidden` `(batch, seq, D)`.

    Filter: each item keeps its `num_kept` visual tokens of largest `scores` `(batch, seq)` (ties: the earlier
    token); the other R = N - K are removed.
    Correlate: removed token i's targets are the kept tokens j of the same item with cosine similarity
    `c_ij >= quantile_q(c_i)` (over the K kept tokens; always including its argmax), with weights
    `w_ij = softmax_j(c_ij)` over its targets (positive, summing to 1).
    Compress: weighted scatter-add (float32), `compress_rule` `"average"`:
    `x_j <- (x_j + sum_i w_ij x_i) / (1 + sum_i w_ij)`, or `"sum"`: `x_j <- x_j + sum_i w_ij x_i`; a kept
    token that received nothing stays bit-exact. Example: visual tokens `[1, 0], [0, 1], [0.1, 1]`, token 2
    merged into token 1: `"average"` gives `[0.05, 1.0]`, `"sum"` `[0.1, 2.0]`. Items' tokens are found in
    row-major order and all items have the same count N.

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
    merged = kept_x + added
    if compress_rule == "average":
        merged = merged / (1 + weights.sum(dim=1)).unsqueeze(-1)  # (items, K, D)
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

    Differences from the official code (kawhiiiileo/FiCoCo, `FiCoCo_L.py` and `llava_llama.py`):
    - official bugs fixed: the official code takes positions `[0, 576)` of the sequence as the visual tokens,
      though LLaVA-1.5 places the image after the system prompt (so it merges system-prompt tokens and never
      touches the last image tokens); here each image's own placeholders are used. `FiCoCo_L.py` as released
      does not parse (its `Compress` mixes indentation levels); the notebook checkpoint next to it does.
    - compress: `compress_rule="average"` (default) divides by `1 + sum_i w_ij`, as the paper (one
      compression module for FiCoCo-V and FiCoCo-L) and FiCoCo-V's code; the released FiCoCo-L returns the
      raw sum, available as `compress_rule="sum"`.
    - deliberate departures (the method is FastV's single cut with a merge): the official code merges
      r = 14 visual tokens in every layer after `control_encoding_layer` = 4, between attention and MLP; here
      the merge happens once, at the input of layer K, to exactly K_img tokens per image. The official filter
      score is `0.6 * sum_j A_vv[i, j] - 0.4 * mean_t A_vt[i, t]` on the head-mean q.k logits before the
      softmax (visual-to-visual and visual-to-text, no causal mask); here it is the last prompt token's
      attention probabilities, as FastV. The official correlation is `0.6 * A_vv + 0.4 * A_vt @ A_tv` on the
      same logits (softmax weights over a top-k shared by all removed tokens, over every other visual token,
      removed ones included); here the cosine similarity of the hidden states entering layer K over the kept
      tokens of the same image, with a token-adaptive number of targets. Merged tokens carry no size in the later layers' attention (the
      official code drops the sizes too). A batch is handled row by row, image by image (the official code
      assumes one image, batch 1).
    """

    name = "ficoco_l"
    settings_class = FiCoCoLSettings
    layer_setting = "ficoco_l_layer"

    def reduce_visual(
        self, hidden: torch.Tensor, scores: torch.Tensor, visual_items: torch.Tensor, num_kept: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each image's `num_kept` best-scored visual tokens and merge the others into them."""
        settings = self.settings
        return ficoco_l_merge(
            hidden, scores, visual_items, num_kept, settings.targets_quantile, settings.compress_rule
        )
