"""What a KV cache written by DeFT-LLaVA must carry for the next call (a later turn that reuses the cache).

Compression leaves the cache in a layout that its length alone does not describe:
- kept visual tokens keep their ORIGINAL position ids, so the text after an image of N patches of which K were
  kept continues at position `cached tokens + (N - K)`; a later call that numbers new tokens from the attention
  mask (what `generate` does when a user passes `past_key_values` back) would place them N - K too early;
- prompt-dependent methods (FastV, FiCoCo-L, Recoverable) decided on a prompt of `deft_prompt_length` tokens,
  and FastV's later layers hold a re-packed cache described by `deft_layer_gather_index`;
- RTD `hybrid`/`adaptive` and Recoverable re-pack the sequence, so the cache holds fewer tokens than the input.

`record_cache_state` stores this on the cache object (attribute `deft_state`, a plain dict);
`read_cache_state` gets it back. The model
writes it after every forward that used a cache and reads it when a forward continues one.
"""

from __future__ import annotations

import torch

STATE_ATTRIBUTE = "deft_state"


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
    """Update the state of `cache` after a forward over new tokens.

    Args:
        position_ids: `(batch, seq)` positions the language model used for the new tokens (None: contiguous).
        new_valid: `(batch, seq)` bool, real (non-padding) new tokens.
        generation_state: `deft_prompt_length` / `deft_layer_gather_index` decided in this forward.
        repacked: the forward dropped placeholders and re-packed the batch.
        gaps: the positions have gaps (kept original positions), so later calls must continue from them.
            Positions are also tracked after a re-packing, whatever `gaps`.
    """
    if cache is None:
        return
    state = dict(read_cache_state(cache) or {})
    state["repacked"] = bool(state.get("repacked")) or repacked
    if generation_state:
        state.setdefault("generation_state", {}).update(generation_state)
    # positions are tracked when they have gaps or the batch was re-packed (decoding steps of a re-packed
    # cache are recognised by continuing them, see the model's `_continue`)
    tracked = gaps or state["repacked"] or state.get("next_position") is not None
    if tracked and position_ids is not None:
        last = position_ids.masked_fill(~new_valid, -1).amax(dim=1) + 1  # (batch,), 0 where nothing new
        previous = state.get("next_position")
        state["next_position"] = last if previous is None else torch.maximum(previous.to(last.device), last)
    setattr(cache, STATE_ATTRIBUTE, state)


def continued_position_ids(state: dict, new_valid: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` positions of new tokens that continue a cache with gaps: the next position recorded, then
    one more per real token (padding gets 0)."""
    next_position = state["next_position"].to(new_valid.device).unsqueeze(1)  # (batch, 1)
    positions = next_position + new_valid.long().cumsum(dim=1) - 1
    return positions.masked_fill(~new_valid, 0)


__all__ = ["STATE_ATTRIBUTE", "continued_position_ids", "read_cache_state", "record_cache_state"]
