"""A long text context inside the prompt (documents, a transcript, many-shot examples): where its tokens are.

A sample marks its context with two marker tokens, `<context> ... </context>` (ids
`config.context_start_token_index` and `config.context_end_token_index`; the processor writes them for a
chat-template item `{"type": "context", "text": ...}`). Everything outside the markers (the question, the chat
template, images) is never compressed. The markers themselves are bookkeeping: they never reach the language
model and do not move the position counter, so with the context kept whole the language model sees exactly the
unmarked prompt (same tokens, same positions). A method that compresses text (`"text" in modalities`: DeFT)
chooses which context tokens the language model sees (`compress_text`); the dropped ones keep their place in
the original positions (gaps), like pruned visual tokens (`TokenLayout.mark_context`).

Markers are read from `input_ids` in a call whose cache is empty (a prefill, or a full recompute of prompt +
generated tokens); a call that continues a cache must not hold any (a context in a later turn: send the whole
conversation again). A sample may hold several contexts; its budget is over all of them together.

Imports: torch and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextContext:
    """The context tokens of one batch, in the input layout.

    Args:
        tokens: `(batch, seq)` bool, context tokens (between a start and an end marker, markers excluded).
        markers: `(batch, seq)` bool, the marker tokens.
        index: `(batch, n)` long, the input position of each sample's context tokens in order (n = the most
            context tokens of a sample; `seq` on the padding slots after a shorter sample's own).
    """

    tokens: torch.Tensor
    markers: torch.Tensor
    index: torch.Tensor

    @classmethod
    def find(cls, input_ids, attention_mask, start_id: int, end_id: int) -> TextContext | None:
        """The context of `input_ids` `(batch, seq)`, or None when no sample holds a marker.

        Raises:
            ValueError: a sample whose markers do not pair up (names the sample and what is wrong).
        """
        valid = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            valid = attention_mask.bool()
        starts = (input_ids == start_id) & valid  # (batch, seq)
        ends = (input_ids == end_id) & valid  # (batch, seq)
        markers = starts | ends
        if not bool(markers.any()):
            return None
        # depth after each token: 1 inside a context (the start marker included), 0 outside
        depth = starts.long().cumsum(1) - ends.long().cumsum(1)  # (batch, seq)
        for sample in range(input_ids.shape[0]):
            problem = None
            if bool((depth[sample] > 1).any()):
                problem = "a <context> inside another <context> (contexts do not nest)"
            elif bool((depth[sample] < 0).any()):
                problem = "a </context> without an opening <context>"
            elif int(depth[sample, -1]) != 0:
                problem = "a <context> that is never closed by </context>"
            if problem is not None:
                raise ValueError(
                    f"sample {sample} of input_ids has {problem} (marker ids {start_id} and {end_id}); mark each "
                    "context as <context> ... </context>, e.g. with a chat-template item "
                    '{"type": "context", "text": ...} that DeftLlavaProcessor.apply_chat_template wraps'
                )
        tokens = (depth == 1) & ~markers & valid
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).expand_as(input_ids)
        key = torch.where(tokens, positions, torch.full_like(positions, seq))
        width = int(tokens.sum(1).max())
        index = key.sort(dim=1).values[:, :width]  # (batch, n): context positions first, `seq` after them
        return cls(tokens=tokens, markers=markers, index=index)

    @property
    def token_mask(self) -> torch.Tensor:
        """`(batch, n)` bool, False on the padding slots of `index`."""
        return self.index < self.tokens.shape[1]

    def pack(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, n, hidden_size)` each sample's context embeddings, in order (zeros on padding slots)."""
        safe = self.index.clamp(max=self.tokens.shape[1] - 1)  # (batch, n)
        rows = torch.gather(inputs_embeds, 1, safe.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1]))
        return rows * self.token_mask.unsqueeze(-1).to(rows.dtype)  # (batch, n, D)

    def place(self, inputs_embeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Put `(batch, n, hidden_size)` context rows back at their input positions -> `(batch, seq, hidden_size)`."""
        flat = rows[self.token_mask].to(inputs_embeds.dtype)  # (context tokens, D), row-major like `tokens`
        return inputs_embeds.masked_scatter(self.tokens.unsqueeze(-1), flat)

    def unpack(self, kept: torch.Tensor) -> torch.Tensor:
        """`(batch, n)` bool over the context slots -> `(batch, seq)` bool over the input (False elsewhere)."""
        batch, seq = self.tokens.shape
        out = torch.zeros(batch, seq + 1, dtype=torch.bool, device=kept.device)  # column `seq` takes padding
        return out.scatter(1, self.index, kept & self.token_mask)[:, :seq]

    def kept_indices(self, keep: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, `(k,)` long input positions of the context tokens in `keep` `(batch, seq)`, ascending."""
        return [(k & t).nonzero().flatten() for k, t in zip(keep, self.tokens)]


__all__ = ["TextContext"]
