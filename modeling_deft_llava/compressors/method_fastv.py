"""FastV: drop the least-attended visual tokens inside the language model (https://arxiv.org/abs/2403.06764).

The compressor runs the decoder layers itself (a Llama-style `language_model`: `layers`, `norm`,
`rotary_emb`), because the layers after the drop see a shorter sequence and need their own attention mask,
and their KV cache is shorter than that of the layers before the drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..modeling_outputs_deft_llava import DeftLlavaModelOutputWithPast
from ..token_layout import check_attention_mask, gather_seq, last_real_index, repack_left, scatter_seq
from ..transformers_compat import cache_kwargs
from .compression_method import LanguageModelCall
from .token_compressor import MethodModule


@dataclass(frozen=True)
class FastVSettings:
    """Settings of FastV.

    Args:
        fastv_layer: the paper's K. Layers `0 .. K-1` see every token; the attention of layer K-1's last
            query ranks the visual tokens; layers `K ..` see the kept ones. Must be in
            `[1, num_hidden_layers - 1]` of the language model (checked when the config is built). Default 2,
            the paper's setting for LLaVA-1.5.
    """

    fastv_layer: int = 2

    def __post_init__(self):
        if (
            isinstance(self.fastv_layer, bool)
            or not isinstance(self.fastv_layer, int)
            or self.fastv_layer < 1
        ):
            raise ValueError(f"fastv_layer must be an int >= 1, got {self.fastv_layer!r}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_query_attention(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor,
    query_index: torch.Tensor | int,
) -> torch.Tensor:
    """Head-averaged attention of ONE query per row over all keys of a decoder layer, recomputed from its input.

    Fused kernels (SDPA) never return attention weights, so the one row FastV needs is rebuilt from the
    layer's own projections: `input_layernorm`, `q_proj`/`k_proj` (and `q_norm`/`k_norm` where the model has
    them), rotary embedding, grouped keys repeated per query head, `scaling`, softmax.

    Args:
        layer: a Llama-style decoder layer.
        hidden_states: `(batch, seq, hidden)` the states ENTERING the layer (no cache before them).
        position_embeddings: `(cos, sin)`, each `(batch, seq, head_dim)`.
        key_valid: `(batch, seq)` bool, False on padding.
        query_index: `(batch,)` long (or one int for every row), each row's query position (causal: it sees keys `0 .. query_index`); each
            row its own, so a padded batch ranks every row as that row alone.

    Returns:
        `(batch, seq)` float32, rows sum to 1 over the visible keys, 0 elsewhere.
    """
    attn = layer.self_attn
    batch, seq, _ = hidden_states.shape
    rows = torch.arange(batch, device=hidden_states.device)
    query_index = torch.as_tensor(query_index, device=hidden_states.device).expand(batch)
    normed = layer.input_layernorm(hidden_states)  # (batch, seq, hidden)
    query = attn.q_proj(normed[rows, query_index].unsqueeze(1)).view(batch, 1, -1, attn.head_dim)
    keys = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    query, keys = query.transpose(1, 2).float(), keys.transpose(1, 2).float()  # (b, h, 1, d), (b, kv, seq, d)
    cos, sin = (t.float().unsqueeze(1) for t in position_embeddings)  # (batch, 1, seq, head_dim)
    qc, qs = (t[rows, :, query_index].unsqueeze(2) for t in (cos, sin))  # (batch, 1, 1, head_dim)
    query = query * qc + _rotate_half(query) * qs
    keys = keys * cos + _rotate_half(keys) * sin
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # (batch, heads, seq, head_dim)
    logits = (query @ keys.transpose(-1, -2)).squeeze(2) * attn.scaling  # (batch, heads, seq)
    columns = torch.arange(seq, device=key_valid.device)
    visible = key_valid & (columns <= query_index.to(key_valid.device).unsqueeze(1))  # (batch, seq)
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)  # (batch, seq)


def causal_mask(key_valid: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """`(batch, 1, q, kv)` ADDITIVE mask (0 = attend, the dtype's minimum = masked) for the last `query_length`
    of `kv` tokens.

    Additive, not boolean: eager attention adds the mask to the scores (a boolean mask there masks nothing),
    SDPA accepts both. Query i sits at key index `kv - q + i` and sees the valid keys up to itself; it always
    sees itself, so a padding query gets a finite (unused) output instead of NaN."""
    kv = key_valid.shape[1]
    keys = torch.arange(kv, device=key_valid.device)
    here = torch.arange(query_length, device=key_valid.device) + kv - query_length  # (q,)
    allowed = (keys <= here.unsqueeze(1)) & key_valid.bool().unsqueeze(1)  # (batch, q, kv)
    allowed = allowed | (keys == here.unsqueeze(1))
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


@dataclass
class FastVLanguageModelOutput:
    """Output of `DeftLlavaFastVCompressor.run_layers`.

    Args:
        last_hidden_state: `(batch, seq, hidden)` in the input layout; dropped visual tokens get zeros.
        past_key_values: the cache (layers from `fastv_layer` on hold the kept tokens only), or None.
        keep: `(batch, seq)` bool, the tokens the later layers saw (None in decoding steps).
        layer_gather_index: `(batch, seq')` index of the later layers' tokens in the prefill (-1 on their
            left padding), or None when nothing was dropped. Decoding steps need it back.
        scores: `(batch, seq)` the last query's attention at layer `fastv_layer - 1`, or None.
    """

    last_hidden_state: torch.Tensor
    past_key_values: object | None = None
    keep: torch.Tensor | None = None
    layer_gather_index: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class DeftLlavaFastVCompressor(MethodModule):
    """FastV (Chen et al., ECCV 2024, https://arxiv.org/abs/2403.06764) inside the language model.

    Layers `0 .. K-1` (K = `fastv_layer`) run on every token. The attention that the LAST prompt token (of each
    row: its last real one, whichever side is padded) pays
    at layer K-1 (head average) ranks each image's visual tokens; each image keeps its `num_kept` best
    (K_img = `num_kept_tokens(N, deft_retention_ratio)`, the same count every method keeps; the first
    `fastv_layer` layers see all N) and layers `K ..` run on the text plus those tokens. Kept tokens keep
    their original position ids; the later layers' KV cache holds only them; decoding continues at the
    original positions. Decoding steps attend to everything in the early layers and to the kept tokens in
    the later ones (each group gets its own mask), which equals recomputing the whole sequence without a
    cache with the same kept set.

    Differences from the paper/official code: the official code prunes a fixed ratio R of the image tokens
    of a single image at a hard-coded offset; here every image of a batch row is ranked separately and keeps
    exactly K_img. The ranking attention row is recomputed from the layer's projections (SDPA stays on). The
    ranking query is the last token of the prompt (`prompt_length - 1`), so a full-recompute forward over
    prompt + generated tokens makes the same choice as the cached prefill. The official code pads nothing;
    here the later layers see a left-re-packed batch (rows may drop different counts). Budget: the project's
    one rule `num_kept_tokens` (round half up, shared by the processor and every method); the official code
    rounds half to even (`round`), so N=9 at ratio 0.5 keeps 5 here and 4 there.
    """

    name = "fastv"
    settings_class = FastVSettings
    layer_setting = "fastv_layer"  # the settings field holding K
    decides_on_prompt = True
    needs_input_layout = True  # `run_language_model` finds the images through the layout's input masks

    @classmethod
    def writes_all_placeholders(cls, config) -> bool:
        return True  # the first layers see all N tokens of every image

    @classmethod
    def check_config(cls, config, settings, num_tokens, num_kept) -> None:
        layers = config.text_config.num_hidden_layers
        cut = getattr(settings, cls.layer_setting)
        if not 1 <= cut <= layers - 1:
            raise ValueError(
                f"{cls.layer_setting} must be in [1, {layers - 1}] for a {layers}-layer language model "
                f"(layers before it see every token, the rest the kept ones), got {cut}"
            )
        if config.use_deft and not config.deft_keep_original_positions:
            # every placeholder is in the input, so 0..L-1 over the input is the original layout; the later layers
            # keep the kept tokens' own ids, as the official FastV code does: the setting would change nothing
            raise ValueError(
                f"{cls.name} keeps the original position ids of the tokens it keeps inside the language model (as "
                "the official FastV code does), so deft_keep_original_positions=False would change nothing; "
                "leave it True for this method"
            )

    def run_language_model(self, call: LanguageModelCall) -> DeftLlavaModelOutputWithPast:
        """The model's hook: run the decoder layers (`run_layers`) and report, per image, the visual tokens the
        later layers kept (`kept_indices`) and the ranking (`compression_scores`, `(images, N)`).

        Raises:
            ValueError: a 4-D attention mask, or `output_attentions` / `output_hidden_states` asked for (on
                the call or in the config): the layers run here return neither.
        """
        check_attention_mask(call.attention_mask)
        kwargs, language_model = call.kwargs, call.language_model
        asked = [
            key
            for key in ("output_attentions", "output_hidden_states")
            if (
                kwargs.get(key)
                if kwargs.get(key) is not None
                else call.output_flags.get(key) or getattr(language_model.config, key, False)
            )
        ]
        if asked:  # asked on the call or in the config: refused, never silently dropped
            raise ValueError(
                f"{self.name} runs the decoder layers itself and does not return {asked}; "
                f"set them to False (on the call and in the config) or use another compression_method"
            )
        inputs_embeds, position_ids, cache = call.inputs_embeds, call.position_ids, call.cache
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
            position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)
        layout = call.layout
        images = layout is not None and "image" in layout.placeholder_masks
        visual_items = layout.item_of_token("image") if images else None
        num_kept = call.num_kept if images else 1
        run = self.run_layers(
            language_model,
            inputs_embeds,
            call.attention_mask,
            position_ids,
            past_key_values=cache,
            # like the stock language model: an explicit use_cache, else the config's (a cache passed in is
            # always extended)
            use_cache=kwargs.get("use_cache")
            if kwargs.get("use_cache") is not None
            else (cache is not None or bool(language_model.config.use_cache)),
            visual_items=visual_items,
            num_kept=num_kept,
            prompt_length=call.prompt_length,
            layer_gather_index=call.generation_state.get("deft_layer_gather_index"),
        )
        state = None
        if run.layer_gather_index is not None and run.past_key_values is not None:
            state = {"deft_layer_gather_index": run.layer_gather_index}
        outputs = DeftLlavaModelOutputWithPast(
            last_hidden_state=run.last_hidden_state,
            **cache_kwargs(run.past_key_values),
            deft_generation_state=state,
        )
        if images and run.keep is not None:
            # the language model decided which visual tokens the later layers keep
            per_image = layout.per_item("image", run.keep)  # (images, N) bool
            sources = layout.per_item("image", layout.source_index)  # (images, N)
            outputs.kept_indices = [src[k] for src, k in zip(sources, per_image)]
            outputs.compression_scores = layout.per_item("image", run.scores)
        return outputs

    def reduce_visual(
        self, hidden: torch.Tensor, scores: torch.Tensor, visual_items: torch.Tensor, num_kept: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What layers `K ..` see: `(batch, seq)` bool keep (text and each image's `num_kept` best-scored
        visual tokens) and the hidden states `(batch, seq, hidden)` entering layer K (FastV: unchanged)."""
        keep = (visual_items < 0) | keep_top_per_item(scores, visual_items, num_kept)
        return keep, hidden

    def run_layers(
        self,
        language_model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_key_values=None,
        use_cache: bool | None = None,
        visual_items: torch.Tensor | None = None,
        num_kept: int = 1,
        prompt_length: int | None = None,
        layer_gather_index: torch.Tensor | None = None,
    ) -> FastVLanguageModelOutput:
        """Run the decoder layers with FastV pruning after layer `fastv_layer - 1`.

        Args:
            inputs_embeds: `(batch, seq, hidden)`; position_ids: `(batch, seq)`.
            attention_mask: `(batch, past + seq)` 2D, 1 on real tokens (None: all real).
            visual_items: `(batch, seq)` long, image item of every visual token in row-major order (-1 on
                text), prefill only; every item has the same number of tokens.
            num_kept: visual tokens each image keeps.
            prompt_length: the ranking query is token `prompt_length - 1` (default: the last input token).
            layer_gather_index: from the prefill's output, needed by decoding steps with a cache.
        """
        layers, cut = language_model.layers, getattr(self.settings, self.layer_setting)
        if not 1 <= cut < len(layers):
            raise ValueError(f"{self.layer_setting} must be in [1, {len(layers) - 1}], got {cut}")
        batch, seq, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if getattr(past_key_values, "is_compileable", False):
            raise ValueError(
                f"{self.name} prunes tokens inside the language model, so its later layers hold a shorter cache "
                "than its first ones: it needs a dynamic cache, not a static one (generate without "
                "cache_implementation='static', or with cache_implementation='dynamic')"
            )
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=language_model.config)
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        full_valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(batch, past + seq, dtype=torch.bool, device=device)
        )  # (batch, past + seq)
        if past and past_key_values.get_seq_length(cut) != past and layer_gather_index is None:
            raise ValueError(
                f"{self.name} decoding with a cache needs deft_layer_gather_index from the prefill output "
                "(generate passes it along)"
            )
        dropping = past == 0 and visual_items is not None and bool((visual_items >= 0).any())
        if past and visual_items is not None and bool((visual_items >= 0).any()):
            raise ValueError(f"{self.name}: images must be in the first forward (the prefill) of a sequence")

        hidden = inputs_embeds
        position_ids = position_ids.expand(batch, -1)  # (batch, seq)
        embeddings = language_model.rotary_emb(hidden, position_ids)  # (cos, sin) (batch, seq, head_dim)
        mask = causal_mask(full_valid, seq, hidden.dtype)
        keep = scores = entering = None
        for i, layer in enumerate(layers):
            if i == cut:
                if dropping:
                    # each row's last real prompt token (left or right padding)
                    query = last_real_index(
                        full_valid[:, : prompt_length if prompt_length is not None else seq]
                    )
                    scores = last_query_attention(layers[cut - 1], entering, embeddings, full_valid, query)
                    keep, hidden = self.reduce_visual(hidden, scores, visual_items, num_kept)
                    keep &= full_valid
                    layer_gather_index, packed_mask = repack_left(keep)  # (batch, seq')
                    hidden = gather_seq(hidden, layer_gather_index, 0.0)  # (batch, seq', hidden)
                    late_positions = gather_seq(position_ids, layer_gather_index, 0)  # (batch, seq')
                    embeddings = language_model.rotary_emb(hidden, late_positions)
                    mask = causal_mask(packed_mask.bool(), hidden.shape[1], hidden.dtype)
                elif layer_gather_index is not None:  # decoding: the prompt part is the re-packed one
                    if not prompt_length:
                        raise ValueError(
                            f"{self.name} decoding with deft_layer_gather_index needs deft_prompt_length"
                        )
                    prompt = int(prompt_length)
                    late_valid = torch.cat(
                        [
                            gather_seq(full_valid[:, :prompt].long(), layer_gather_index, 0).bool(),
                            full_valid[:, prompt:],
                        ],
                        dim=1,
                    )  # (batch, seq' + generated so far)
                    mask = causal_mask(late_valid, seq, hidden.dtype)
            if i == cut - 1:
                entering = hidden  # (batch, seq, hidden) the input of the ranking layer
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **cache_kwargs(past_key_values),
                position_embeddings=embeddings,
            )
        hidden = language_model.norm(hidden)
        prompt_index = layer_gather_index
        if dropping:
            hidden = scatter_seq(hidden, layer_gather_index, seq)  # (batch, seq, hidden), dropped -> 0
            if prompt_length is not None and int(prompt_length) < seq:
                # tokens after the prompt (the drafts of assisted decoding) follow the re-packed prompt in the
                # later layers' cache, as generated tokens do: decoding steps need the prompt's index alone
                prompt_index = repack_left(keep[:, : int(prompt_length)])[0]
        return FastVLanguageModelOutput(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            keep=keep,
            layer_gather_index=prompt_index if dropping else None,
            scores=scores,
        )


def keep_top_per_item(scores: torch.Tensor, visual_items: torch.Tensor, num_kept: int) -> torch.Tensor:
    """`(batch, seq)` bool: for every item (image), its `num_kept` visual tokens of largest score.

    Items' tokens are found in row-major order and all items have the same token count; ties go to the
    earlier token."""
    flat_items = visual_items.flatten()  # (batch * seq,)
    where = (flat_items >= 0).nonzero().squeeze(1)  # (total,) ascending
    num_items = int(flat_items.max()) + 1
    per_item = where.view(num_items, -1)  # (items, N) flat positions
    item_scores = scores.flatten()[per_item]  # (items, N)
    order = item_scores.sort(dim=1, descending=True, stable=True).indices[:, :num_kept]  # (items, K)
    keep = torch.zeros_like(flat_items, dtype=torch.bool)
    keep[per_item.gather(1, order).flatten()] = True
    return keep.view_as(visual_items)
