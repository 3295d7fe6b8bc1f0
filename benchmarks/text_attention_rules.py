"""FastV's attention rule applied to a text context, for the text-context benchmark (`benchmarks/text_context.py`).

FastV (Chen et al., ECCV 2024, https://arxiv.org/abs/2403.06764) ranks image tokens by the attention the last
token pays them at an early decoder layer and drops the least attended ones for the remaining layers. Here the
same rule ranks the tokens of the `<context>` instead (the question and the chat template are never dropped),
and each sample keeps the same K = `kept_counts(n, deft_text_retention_ratio)` of its n context tokens as DeFT
and the simple rules. Two placements:

- `fastv` (as FastV does, inside the decoder): layers `0 .. L-1` (L = `layer`) run on every token; the
  head-averaged attention of the last prompt token at layer L-1 ranks the context tokens; layers `L ..` run on
  the kept ones. It reuses the model's FastV code (`DeftLlavaFastVCompressor.run_layers`: the ranking row is
  recomputed from layer L-1's projections, kept tokens keep their original positions, later layers see a
  left-re-packed batch) with a per-sample budget. It costs more than the rules: L layers see the whole context.
- `fastv_pre` (before the language model, same language-model compute as DeFT and the rules): the same
  ranking row (layers `0 .. L-2` on every token, then layer L-1's attention row of the last token), then the
  WHOLE language model runs on the kept tokens only. The ranking pass costs L-1 layers on the full sequence
  (none for L = 1: the row is computed from the embeddings), counted in the benchmark's prefill time.

Both act through the model's `run_language_model` hook (the DeFT module's hook is shadowed for a block, as
`text_rule` shadows `compress_text`): the model drops the markers and hands over the language model's input
(text compression off, so every context token is in it) with the prompt's layout, which says where the context
tokens are. Prefill only (a forward over the prompt); not a model feature: `generate` is not supported.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from modeling_deft_llava.compressors.method_fastv import (
    DeftLlavaFastVCompressor,
    FastVSettings,
    causal_mask,
    last_query_attention,
)
from modeling_deft_llava.deft.topk_selector import kept_counts
from modeling_deft_llava.modeling_outputs_deft_llava import DeftLlavaModelOutputWithPast
from modeling_deft_llava.token_layout import gather_seq, repack_left, scatter_seq

PLACEMENTS = ("fastv", "fastv_pre")


def keep_top_per_row(scores: torch.Tensor, member: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` bool: each row's `counts[row]` members of largest score (ties to the earlier token).

    Args:
        scores: `(batch, seq)`; member: `(batch, seq)` bool, the tokens that compete; counts: `(batch,)` long.
    """
    ranked = scores.float().masked_fill(~member, float("-inf"))
    order = ranked.sort(dim=1, descending=True, stable=True).indices  # (batch, seq)
    take = torch.arange(scores.shape[1], device=scores.device).expand_as(order) < counts.unsqueeze(1)
    keep = torch.zeros_like(member)
    keep.scatter_(1, order, take)
    return keep & member


class _TextFastV(DeftLlavaFastVCompressor):
    """FastV's `run_layers` with the context tokens as the one item of each row and a per-row budget."""

    def __init__(self, token_dim: int, layer: int, ratio: float):
        super().__init__(token_dim, FastVSettings(fastv_layer=layer))
        self.ratio = ratio

    def reduce_visual(self, hidden, scores, visual_items, num_kept):
        context = visual_items >= 0  # (batch, seq)
        counts = kept_counts(context.sum(1), self.ratio)  # (batch,)
        return ~context | keep_top_per_row(scores, context, counts), hidden


def context_in_model_layout(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The context tokens in the input `(batch, seq_in)` and in the language model's layout `(batch, seq)`."""
    context_in = torch.zeros_like(layout.valid)
    for row, kept in enumerate(layout.text_kept_indices):
        context_in[row, kept] = True
    if layout.gather_index is None:
        return context_in, context_in
    return context_in, gather_seq(context_in.long(), layout.gather_index, 0).bool()


def fastv_pre_run(language_model, inputs_embeds, attention_mask, position_ids, context, ratio, layer):
    """Rank the context by layer `layer - 1`'s last-token attention, then run the whole language model on the
    kept tokens. Returns `(hidden (batch, seq, D) with zeros on dropped rows, keep (batch, seq) bool)`."""
    batch, seq, _ = inputs_embeds.shape
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(context)
    hidden = inputs_embeds
    embeddings = language_model.rotary_emb(hidden, position_ids)
    mask = causal_mask(valid, seq, hidden.dtype)
    for module in language_model.layers[: layer - 1]:
        hidden = module(
            hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=embeddings
        )
    scores = last_query_attention(language_model.layers[layer - 1], hidden, embeddings, valid, seq - 1)
    keep = valid & (~context | keep_top_per_row(scores, context, kept_counts(context.sum(1), ratio)))
    index, packed = repack_left(keep)  # (batch, seq')
    out = language_model(
        inputs_embeds=gather_seq(inputs_embeds, index, 0.0),
        attention_mask=packed,
        position_ids=gather_seq(position_ids, index, 0),
        use_cache=False,
    )
    return scatter_seq(out.last_hidden_state, index, seq), keep


@contextmanager
def text_attention_rule(model, placement: str, ratio: float, layer: int):
    """For the block, forwards over a prompt with a `<context>` keep K of its tokens by FastV's attention rule
    (`placement` in `PLACEMENTS`, `layer` = FastV's L). Yields a dict that each forward fills with `kept`
    (per sample, the input positions of the kept context tokens), `tokens_seen` (per sample, the tokens the
    first decoder layer saw) and `token_layers` (per sample, the tokens each decoder layer saw, summed over
    layers).

    Raises:
        ValueError: an unknown placement, a layer outside `[1, num_hidden_layers - 1]`, or compression off.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    layers = model.config.text_config.num_hidden_layers
    if not 1 <= layer <= layers - 1:
        raise ValueError(
            f"layer must be in [1, {layers - 1}] for a {layers}-layer language model, got {layer}"
        )
    record: dict = {}
    fastv = _TextFastV(model.config.text_config.hidden_size, layer, ratio)

    def run_language_model(call):
        layout = call.layout
        if layout is None or layout.text_kept_indices is None:
            return None  # no context in this call: the stock language model
        context_in, context = context_in_model_layout(layout)
        valid = call.attention_mask.bool()
        position_ids = call.position_ids
        if placement == "fastv":
            run = fastv.run_layers(
                call.language_model,
                call.inputs_embeds,
                call.attention_mask,
                position_ids,
                use_cache=False,
                visual_items=torch.where(context, 0, -1),
            )
            hidden, keep = run.last_hidden_state, run.keep
            before = layer  # layers that saw every token
        else:
            hidden, keep = fastv_pre_run(
                call.language_model,
                call.inputs_embeds,
                call.attention_mask,
                position_ids,
                context,
                ratio,
                layer,
            )
            before = 0
        seen_all, seen_kept = valid.sum(1), (keep & valid).sum(1)  # (batch,)
        record["token_layers"] = (before * seen_all + (layers - before) * seen_kept).tolist()
        record["tokens_seen"] = (seen_all if before else seen_kept).tolist()  # entering the first layer
        if layout.gather_index is None:
            kept_in = keep & context_in
        else:
            seq_in = context_in.shape[1]
            index = layout.gather_index.masked_fill(layout.gather_index < 0, seq_in)
            kept_in = torch.zeros(keep.shape[0], seq_in + 1, dtype=torch.bool).scatter(1, index, keep)
            kept_in = kept_in[:, :seq_in] & context_in
        record["kept"] = [row.nonzero().flatten() for row in kept_in]
        return DeftLlavaModelOutputWithPast(last_hidden_state=hidden)

    method = model.model.active_method
    if method is None:
        raise ValueError(
            "text_attention_rule acts through the compression method's run_language_model hook: load the model "
            "with use_deft=True (the model keeps the whole context; the rule drops)"
        )
    method.run_language_model = run_language_model  # an instance attribute shadows the hook for this block
    saved = model.config.deft_text_retention_ratio
    model.config.deft_text_retention_ratio = None  # the model keeps the whole context; the rule drops
    try:
        yield record
    finally:
        del method.run_language_model
        model.config.deft_text_retention_ratio = saved


__all__ = ["PLACEMENTS", "fastv_pre_run", "keep_top_per_row", "text_attention_rule"]
