"""The token layout of a compressed sequence: the one place that decides where tokens go and where they sit.

`TokenLayout` owns, for one forward pass:
- where each image's (or video's) rows go: its placeholders, in order, filled by `place`;
- their position ids: ORIGINAL positions by default (kept patch j of an image starting at position S sits at
  S + j; the text after an image of N patches resumes at S + N: the gaps stay), or renumbered 0..L-1
  (`deft_keep_original_positions=False`, the official LLaVA integrations of most baselines);
- dropping the placeholders a method left unused (content-dependent counts: DeFT `hybrid`/`adaptive`,
  Recoverable), the context markers and the context text tokens a method did not keep (`mark_context`), and
  re-packing the batch with left padding (`arrange`), labels included (`gather_labels`);
- the 2-D padding mask (a 4-D mask is refused while compression is on: `check_attention_mask`);
- the state a later call needs (`record` on the KV cache, read back by `continue_cache`): the next position
  of every row (the gaps make the cache length wrong), whether the cache was re-packed, and what a
  prompt-dependent method decided on (`generation_state`).

Imports: torch and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STATE_ATTRIBUTE = "deft_state"  # the attribute of a transformers Cache that carries `record`'s state


# ----------------------------------------------------------------------------------- sequence primitives
def repack_left(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded compaction of the True entries of `keep` `(batch, seq)`.

    Returns `gather_index` `(batch, seq')` (-1 on padding) and `attention_mask` `(batch, seq')`, with
    seq' = max kept per row; kept tokens keep their order.
    """
    batch, seq = keep.shape
    counts = keep.sum(1)  # (batch,)
    width = int(counts.max()) if batch else 0
    # order: padding slots first (key -1), kept tokens in original order after them
    arange = torch.arange(seq, device=keep.device).expand(batch, seq)
    key = torch.where(keep, arange, torch.full_like(arange, -1))
    sorted_idx = key.sort(dim=1).values[:, seq - width :]  # (batch, width)
    attention_mask = (sorted_idx >= 0).long()
    return sorted_idx, attention_mask


def gather_seq(tensor: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    """`tensor` `(batch, seq, ...)` at `index` `(batch, seq')` (-1 -> `fill`)."""
    safe = index.clamp(min=0)
    view = safe.view(*safe.shape, *([1] * (tensor.dim() - 2))).expand(*safe.shape, *tensor.shape[2:])
    out = torch.gather(tensor, 1, view)
    pad = (index < 0).view(*index.shape, *([1] * (tensor.dim() - 2)))
    return out.masked_fill(pad, fill)


def scatter_seq(values: torch.Tensor, index: torch.Tensor, seq: int) -> torch.Tensor:
    """Inverse of `gather_seq`: `values` `(batch, seq', ...)` put back at `index` in a zero `(batch, seq, ...)`."""
    out = values.new_zeros(values.shape[0], seq + 1, *values.shape[2:])  # slot `seq` takes the padding
    safe = index.masked_fill(index < 0, seq)
    view = safe.view(*safe.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return out.scatter(1, view, values)[:, :seq]


def scatter_rows(mask: torch.Tensor, values: torch.Tensor, fill=0) -> torch.Tensor:
    """Place flat per-row `values` `(num_rows,)` at the True entries of `mask` `(batch, seq)` (row-major)."""
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=mask.device)
    out[mask] = values.to(mask.device)
    return out


def original_position_ids(
    valid: torch.Tensor, visual: torch.Tensor, source_index: torch.Tensor, advance: torch.Tensor
) -> torch.Tensor:
    """Position ids that keep the uncompressed layout, `(batch, seq)`.

    Args:
        valid: `(batch, seq)` bool, False on padding.
        visual: `(batch, seq)` bool, True on placeholder rows.
        source_index: `(batch, seq)` long, patch index of each visual row (0 elsewhere).
        advance: `(batch, seq)` long, how far the position counter moves after this token: 1 for a text
            token, N for the LAST row of an image of N patches, 0 for other rows and padding.

    A text token sits at the counter; a visual row at the counter value where its image starts plus its patch
    index. Padding gets 0.
    """
    before = torch.cumsum(advance, dim=1) - advance  # (batch, seq) counter before each token
    positions = before + torch.where(visual, source_index, torch.zeros_like(source_index))
    return positions.masked_fill(~valid, 0)


def contiguous_position_ids(valid: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` positions 0, 1, ... over the real tokens of each row (padding gets 0)."""
    return (valid.long().cumsum(1) - 1).masked_fill(~valid, 0)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """`(batch,)` the column of each row's last real token in the 2-D padding `mask` `(batch, seq)`, left or
    right padded (0 for a row without one)."""
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return columns.masked_fill(~mask.bool(), -1).amax(dim=1).clamp(min=0)


def check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    """Compression needs the 2-D `(batch, sequence)` padding mask (original positions, re-packing, in-LLM
    pruning); `generate` keeps it 2-D for this model (`create_masks_for_generate`).

    Raises:
        ValueError: a mask of another rank (names its shape).
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)}: with use_deft=True the model needs the "
            "2-D (batch, sequence) padding mask (1 = token, 0 = padding) and builds the attention masks itself"
        )


def check_rows_per_sample(modality: str, per_sample: list[int], per_item: list[int]) -> None:
    """Every sample's placeholders must hold whole images: the images, in order, fill the samples one after
    the other. A matching total alone is not enough (5 + 3 placeholders for two images of 4 rows would put
    one image's tokens into the other sample).

    Raises:
        ValueError: names the placeholders per sample and the rows per image.
    """
    item = 0
    for sample, wanted in enumerate(per_sample):
        filled = 0
        while filled < wanted and item < len(per_item):
            filled += per_item[item]
            item += 1
        if filled != wanted:
            raise ValueError(
                f"{modality.capitalize()} features and {modality} tokens do not match per sample: the samples "
                f"hold {per_sample} <{modality}> placeholders, but the {len(per_item)} {modality}(s), in "
                f"order, produce {per_item} rows, so sample {sample} would get part of a {modality}; each "
                f"sample needs the placeholders of its own {modality}s (build inputs with DeftLlavaProcessor)"
            )


# ----------------------------------------------------------------------------------- the layout
@dataclass
class TokenLayout:
    """Where the tokens of one prefill (a forward with visual inputs) go.

    Args:
        valid: `(batch, seq)` bool, real input tokens (False on padding).
        visual: `(batch, seq)` bool, placeholder rows of every modality.
        source_index: `(batch, seq)` long, the patch index of each visual row (0 elsewhere).
        advance: `(batch, seq)` long, how far the position counter moves after each token (see
            `original_position_ids`).
        used: `(batch, seq)` bool, tokens the language model sees, or None (every token).
        placeholder_masks: modality -> `(batch, seq)` bool placeholders of that modality.
        rows_per_item: modality -> rows of each item, in order.
        kept_indices: list, per item (images first, then videos), of the source patches the language model
            sees.
        text_kept_indices: list, per sample, of the input positions of the context tokens the language model
            sees, or None (no context; `mark_context`).
        num_reconstructed: `(batch,)` rows rebuilt by a token dictionary per sample, or None.
        gather_index: `(batch, seq')` index of every kept token in the input (-1 on new padding), or None when
            nothing was dropped (`arrange`).
        attention_mask: `(batch, seq')` the compacted 2-D mask after re-packing, or None.
        position_ids: `(batch, seq')` the positions the language model uses (`arrange`).
    """

    valid: torch.Tensor
    visual: torch.Tensor
    source_index: torch.Tensor
    advance: torch.Tensor
    used: torch.Tensor | None = None
    placeholder_masks: dict = field(default_factory=dict)
    rows_per_item: dict = field(default_factory=dict)
    kept_indices: list = field(default_factory=list)
    text_kept_indices: list | None = None
    num_reconstructed: torch.Tensor | None = None
    gather_index: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @classmethod
    def start(cls, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> TokenLayout:
        """An empty layout for `inputs_embeds` `(batch, seq, D)`: text tokens move the counter by 1, padding by 0.
        A 4-D `attention_mask` (compression off) counts every token as real."""
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool()
        return cls(
            valid=valid,
            visual=torch.zeros(batch, seq, dtype=torch.bool, device=device),
            source_index=torch.zeros(batch, seq, dtype=torch.long, device=device),
            advance=valid.long(),
        )

    def place(self, modality, features, mask, inputs_embeds, config, reconsidered=None) -> torch.Tensor:
        """Scatter one modality's rows (`features.pooler_output`) into its placeholders `mask` `(batch, seq)`;
        returns the new `inputs_embeds` and records the rows' sources, counters and which rows are used.

        `reconsidered`: `(batch,)` bool, samples of a second prefill that use every row (DeFT `adaptive`).

        Raises:
            ValueError: the placeholders do not match the rows (in total, or per sample).
        """
        rows = features.pooler_output
        counts = [r.shape[0] for r in rows]
        # the checks read the mask's values (a graph break): skipped while torch.compile traces, eager calls check
        checked = not torch.compiler.is_compiling()
        n_placeholders = int(mask.sum()) if checked else sum(counts)
        if n_placeholders != sum(counts):
            # stock's wording first ("Image features and image tokens do not match, tokens: ..."): tools match on it
            raise ValueError(
                f"{modality.capitalize()} features and {modality} tokens do not match, tokens: {n_placeholders}, "
                f"features: {sum(counts)}; the text has {n_placeholders} "
                f"<{modality}> placeholders but the {len(rows)} {modality}(s) produce {sum(counts)} rows "
                f"({counts}); build inputs with DeftLlavaProcessor for this model's config "
                f"(use_deft={config.use_deft}, retention={config.deft_retention_ratio}, "
                f"mode={config.deft_inference_mode})"
            )
        if checked:
            check_rows_per_sample(modality, mask.sum(dim=1).tolist(), counts)
        device = inputs_embeds.device
        flat = torch.cat(list(rows), dim=0).to(device, inputs_embeds.dtype)  # (total_rows, D)
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)
        source = torch.cat([s.to(device) for s in features.source_indices])  # (total_rows,)
        # the position counter moves by N (the item's source tokens) after the item's LAST row
        last = torch.cat(
            [torch.nn.functional.one_hot(torch.tensor(c - 1, device=device), c).bool() for c in counts]
        )  # (total_rows,)
        n_src = torch.cat(
            [torch.full((c,), n, device=device) for c, n in zip(counts, features.num_source_tokens)]
        )  # (total_rows,)
        advance = scatter_rows(mask, torch.where(last, n_src, torch.zeros_like(n_src)).long())
        self.advance = torch.where(mask, advance, self.advance)
        self.source_index = self.source_index + scatter_rows(mask, source.long())
        self.visual |= mask
        self.placeholder_masks[modality] = mask
        self.rows_per_item[modality] = counts
        rows_seen = torch.ones_like(source, dtype=torch.bool)
        if features.rows_used is not None:
            used = scatter_rows(mask, torch.cat([k.to(device) for k in features.rows_used]), fill=True)
            if reconsidered is not None:  # a second prefill: those samples use every row
                used = used | (mask & reconsidered.to(device).view(-1, 1))
            selected = scatter_rows(
                mask, torch.cat([k.to(device) for k in features.rows_selected]), fill=True
            )
            rebuilt = (used & ~selected).sum(1)  # (batch,)
            self.num_reconstructed = (
                rebuilt if self.num_reconstructed is None else self.num_reconstructed + rebuilt
            )
            self.used = used if self.used is None else self.used & used
            rows_seen = used[mask]
        if features.rows_used is None:  # every row seen (no boolean indexing: traceable by torch.compile)
            self.kept_indices += list(source.split(counts))
        else:
            self.kept_indices += [src[k] for src, k in zip(source.split(counts), rows_seen.split(counts))]
        return inputs_embeds

    def mark_context(self, markers: torch.Tensor, keep: torch.Tensor, kept_indices: list) -> None:
        """Drop the context markers and the context tokens a method did not keep (`text_context.py`).

        Args:
            markers: `(batch, seq)` bool, the marker tokens: never seen, and they do not move the position
                counter (the kept-whole context sits exactly where the unmarked prompt puts it).
            keep: `(batch, seq)` bool, False on markers and dropped context tokens; a dropped context token
                still moves the counter (its gap stays, like a pruned visual token's).
            kept_indices: per sample, the input positions of the kept context tokens (`text_kept_indices`).
        """
        self.advance = self.advance.masked_fill(markers, 0)
        used = keep & ~markers
        self.used = used if self.used is None else self.used & used
        self.text_kept_indices = kept_indices

    def arrange(self, inputs_embeds, attention_mask, position_ids, original_positions: bool):
        """Positions, then re-packing. Returns `(inputs_embeds, attention_mask, position_ids)` for the language
        model; `self.gather_index`, `self.attention_mask` and `self.position_ids` record what was done.

        Args:
            original_positions: `deft_keep_original_positions`: keep the gaps (computed here, replacing
                `position_ids`), or number the tokens the language model sees 0..L-1 (a caller's
                `position_ids` are kept while nothing is dropped).
        """
        valid = self.valid
        if original_positions:
            position_ids = original_position_ids(valid, self.visual, self.source_index, self.advance)
            if attention_mask is None:
                # without a mask (and without a cache) transformers reads every position gap as the start of a
                # new packed sequence and blocks attention across it: hand the language model an explicit mask
                attention_mask = valid.long()
        elif position_ids is None:
            position_ids = contiguous_position_ids(valid)
        if self.used is not None and not bool(self.used[valid].all()):
            self.gather_index, self.attention_mask = repack_left(self.used & valid)
            inputs_embeds = gather_seq(inputs_embeds, self.gather_index, 0.0)
            position_ids = gather_seq(position_ids, self.gather_index, 0)
            attention_mask = self.attention_mask
            if not original_positions:  # contiguous over the tokens the language model sees, not over all N
                # placeholders (also when generate passed positions: it numbered all N placeholders)
                position_ids = contiguous_position_ids(self.attention_mask.bool())
        self.position_ids = position_ids
        return inputs_embeds, attention_mask, position_ids

    @property
    def seen(self) -> torch.Tensor:
        """`(batch, seq')` bool, the real tokens the language model saw (after re-packing)."""
        return self.valid if self.gather_index is None else self.attention_mask.bool()

    def item_of_token(self, modality: str) -> torch.Tensor:
        """`(batch, seq)` long, the item (image) index of every placeholder of `modality` in row-major order,
        -1 elsewhere (input layout, before re-packing); every item has the same number of rows."""
        mask = self.placeholder_masks[modality]
        n = self.rows_per_item[modality][0]
        return scatter_rows(mask, torch.arange(int(mask.sum()), device=mask.device) // n, fill=-1)

    def per_item(self, modality: str, values: torch.Tensor) -> torch.Tensor:
        """`(items, N)` the `(batch, seq)` `values` at the placeholders of `modality` (input layout)."""
        mask = self.placeholder_masks[modality]
        return values[mask].view(-1, self.rows_per_item[modality][0])

    def gather_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """`labels` `(batch, seq)` in the layout the language model saw (-100 on new padding)."""
        if self.gather_index is None:
            return labels
        return gather_seq(labels, self.gather_index.to(labels.device), -100)

    def record(self, cache, generation_state: dict | None, original_positions: bool) -> None:
        """Store on `cache` what a later call that continues it needs (`continue_cache`)."""
        record_cache_state(
            cache,
            self.position_ids,
            self.seen,
            generation_state=generation_state,
            repacked=self.gather_index is not None,
            gaps=original_positions,
        )


# ----------------------------------------------------------------------------------- state on the cache
def read_cache_state(cache) -> dict | None:
    """The state recorded on `cache` (None: a cache this model never wrote, or no cache)."""
    return getattr(cache, STATE_ATTRIBUTE, None) if cache is not None else None


def record_cache_state(
    cache,
    position_ids: torch.Tensor | None,
    new_valid: torch.Tensor,
    generation_state: dict | None = None,
    repacked: bool = False,
    gaps: bool = False,
) -> None:
    """Update the state of `cache` (attribute `deft_state`, a plain dict) after a forward over new tokens.

    Compression leaves the cache in a layout that its length alone does not describe: kept visual tokens keep
    their original positions (the text after an image of N patches of which K were kept continues at `cached
    tokens + (N - K)`), prompt-dependent methods decided on a prompt of `deft_prompt_length` tokens (and a
    method may carry its own state, opaque here: FastV's later layers hold a re-packed cache that its state
    describes), and re-packing leaves the cache shorter than the input.

    Args:
        position_ids: `(batch, seq)` positions the language model used for the new tokens (None: contiguous).
        new_valid: `(batch, seq)` bool, real (non-padding) new tokens.
        generation_state: what a method decided in this forward for later steps (`deft_prompt_length`, ...).
        repacked: the forward dropped placeholders and re-packed the batch.
        gaps: the positions have gaps (kept original positions), so later calls must continue from them.
            Positions are also tracked after a re-packing, whatever `gaps`.
    """
    if cache is None:
        return
    state = dict(read_cache_state(cache) or {})
    state["repacked"] = bool(state.get("repacked")) or repacked
    if generation_state:
        state["generation_state"] = {**state.get("generation_state", {}), **generation_state}
    length = cache.get_seq_length()
    # positions are tracked when they have gaps or the batch was re-packed (decoding steps of a re-packed
    # cache are recognised by continuing them, see `continue_cache`)
    previous = None
    if state.get("next_position") is not None:  # where the new tokens started (the cache held them not yet)
        previous = next_cached_position(state, length - new_valid.shape[1])
    tracked = gaps or state["repacked"] or previous is not None
    if tracked and position_ids is not None:
        last = position_ids.masked_fill(~new_valid, -1).amax(dim=1) + 1  # (batch,), 0 where nothing new
        state["next_position"] = last if previous is None else torch.maximum(previous.to(last.device), last)
    elif previous is not None:  # contiguous new tokens
        state["next_position"] = previous.to(new_valid.device) + new_valid.long().sum(dim=1)
    state["cache_length"] = length
    setattr(cache, STATE_ATTRIBUTE, state)


def next_cached_position(state: dict, cache_length: int) -> torch.Tensor:
    """`(batch,)` the position the next token of every row takes after a cache of `cache_length` tokens.

    The recorded next position follows the cache's length: `generate` crops the cache after the drafts it
    rejects (assisted and prompt-lookup decoding), and the next token then sits where the first rejected one
    was. Tokens the cache lost (or gained) since the record move the next position by as many."""
    return state["next_position"] + (cache_length - state["cache_length"])


def tokens_dropped_since_record(cache) -> int:
    """Tokens `cache` lost since this model's last forward recorded its state (the rejected drafts that
    `generate` cropped in assisted decoding), 0 for a cache without state."""
    state = read_cache_state(cache)
    if state is None or state.get("cache_length") is None:
        return 0
    return max(0, state["cache_length"] - cache.get_seq_length())


def continued_position_ids(state: dict, cache_length: int, new_valid: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` positions of new tokens that continue a cache of `cache_length` tokens with gaps: the next
    position (`next_cached_position`), then one more per real token (padding gets 0)."""
    next_position = next_cached_position(state, cache_length).to(new_valid.device).unsqueeze(1)  # (batch, 1)
    positions = next_position + new_valid.long().cumsum(dim=1) - 1
    return positions.masked_fill(~new_valid, 0)


@dataclass
class Continuation:
    """A forward without visual inputs that continues a cache: the positions of its new tokens and what the
    prefill recorded for later steps (`generation_state`), or None when the cache carries no state."""

    position_ids: torch.Tensor | None
    new_valid: torch.Tensor
    generation_state: dict | None


def continue_cache(cache, inputs_embeds, attention_mask, position_ids, refusal) -> Continuation:
    """Positions for new tokens after a cache this model wrote (decoding steps, a later turn).

    New tokens continue the cached positions (gaps of the kept original positions included, whatever
    `position_ids` a caller derived from the attention mask).

    Raises:
        ValueError: the cache was re-packed and the call is not one of generate's own decoding steps (whose
            positions continue it exactly), with `refusal(position_ids, expected)` as the message: the input ids and the attention
            mask of a later turn no longer line up with the cache.
    """
    state = read_cache_state(cache)
    batch, seq = inputs_embeds.shape[:2]
    new_valid = torch.ones(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        new_valid = attention_mask[:, -seq:].bool()
    if state is None:
        return Continuation(position_ids, new_valid, None)
    expected = None
    if state.get("next_position") is not None:
        expected = continued_position_ids(state, cache.get_seq_length(), new_valid)
    if state.get("repacked") and not (
        expected is not None
        and position_ids is not None
        and torch.equal(position_ids.masked_fill(~new_valid, 0), expected)
    ):
        raise ValueError(refusal(position_ids, expected))
    if expected is not None:
        position_ids = expected
    return Continuation(position_ids, new_valid, dict(state.get("generation_state") or {}))


__all__ = [
    "Continuation",
    "TokenLayout",
    "check_attention_mask",
    "continue_cache",
    "gather_seq",
    "last_real_index",
    "next_cached_position",
    "read_cache_state",
    "record_cache_state",
    "repack_left",
    "scatter_seq",
    "tokens_dropped_since_record",
]
