"""`DeftLlavaDataCollator`: conversation records -> padded model inputs with masked labels.

The chat template of the processor renders the conversation; each assistant turn is located by rendering
the conversation up to that turn (with the generation prompt, then with the answer), so the collator knows
which characters are prompt and which are answer. Each piece is tokenised on its own with every `<image>`
expanded to the placeholder count the processor writes for that image (`processor.num_placeholders`), so the
ids equal what `processor(images=..., text=...)` gives for the whole text (checked in the tests for the
word-level tokenizer; for BPE tokenizers piece boundaries fall on template boundaries, as in LLaVA's own
training code).

Labels are -100 on the prompt (system and user turns, the template's role markers and generation prompt),
on image placeholders and on padding; the answer text and the template's end-of-turn token are learned.

Two encodings when feedback-guided scoring is on (`full_processor` given): the compressed one (K
placeholders per image, the DeFT processor) and the full-token one (all N placeholders, a processor with
`use_deft=False`) for the full-token pass whose task-loss gradient gives DeFT its feedback score `s_fb`.
They share `pixel_values` and hold the same text tokens.

Too-long rule (`max_length`): a sample longer than `max_length` tokens (the longer encoding counts) loses
tokens from its right end only (answer text), the same number in both encodings. The cut never reaches an
image placeholder or the first answer token: such samples are skipped when the dataset is loaded (see
`required_length`, `ConversationDataset`) and counted in the log; a batch that still holds one raises
`ValueError` naming its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .data import IMAGE_TOKEN

IGNORE_INDEX = -100


@dataclass
class Encoding:
    """One tokenised sample: `input_ids` and `labels` `(seq,)`, and `required`: tokens a cut must keep."""

    input_ids: list[int]
    labels: list[int]
    required: int


class DeftLlavaDataCollator:
    """Collate normalised records (`ConversationDataset` items) into `DeftLlavaForConditionalGeneration` inputs.

    Args:
        processor: the `DeftLlavaProcessor` of the model (its DeFT settings decide the placeholder count).
        full_processor: a processor with `use_deft=False` (N placeholders per image); given, the batch also
            holds `full_input_ids`, `full_attention_mask` and `full_labels` for the full-token feedback pass.
        max_length: the too-long rule (module docstring); None = no limit.

    Returns from `__call__` (batch of B records, right padding):
        input_ids, attention_mask, labels: `(B, seq)`; pixel_values: `(num_images, C, H, W)` when the batch
        holds images; full_input_ids, full_attention_mask, full_labels: `(B, seq_full)` with `full_processor`.
    """

    def __init__(self, processor, full_processor=None, max_length: int | None = None):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {max_length!r}")
        self.processor = processor
        self.full_processor = full_processor
        self.max_length = max_length
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            # an unknown placeholder would resolve to <unk> and mask unknown answer words as image tokens
            raise ValueError(
                f"the tokenizer has no {processor.image_token!r} token (it resolves to "
                f"{self.image_token_id!r}); use a tokenizer with the image placeholder (DeftLlavaProcessor "
                "refuses such tokenizers when it is built)"
            )
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        self._size_cache: dict[tuple[int, int], tuple[int, int]] = {}

    # ------------------------------------------------------------------ text
    def render_pieces(self, messages: list[dict], source: str = "") -> list[tuple[str, bool]]:
        """The rendered conversation as `(text, is_answer)` pieces, in order."""
        pieces, done = [], 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:turn], add_generation_prompt=True)
            answered = self._render(messages[: turn + 1], add_generation_prompt=False)
            if (
                not answered.startswith(prompt)
                or not prompt.startswith(answered[:done])
                or len(prompt) < done
            ):
                raise ValueError(
                    f"{source}: the chat template does not render turns as prefixes of each other; it cannot "
                    "be used to locate the answers"
                )
            pieces += [(prompt[done:], False), (answered[len(prompt) :], True)]
            done = len(answered)
        rest = self._render(messages, add_generation_prompt=False)[done:]
        if rest:
            pieces.append((rest, False))
        return [(text, answer) for text, answer in pieces if text]

    def _render(self, messages, add_generation_prompt):
        if not messages:
            return ""
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ images
    def processed_size(self, image) -> tuple[int, int]:
        """`(height, width)` of an image after the image processor (cached per input size)."""
        key = image.size
        if key not in self._size_cache:
            blank = Image.new("RGB", image.size)  # the output size depends only on the input size
            pixel = self.processor.image_processor([blank], return_tensors="pt")["pixel_values"]
            self._size_cache[key] = tuple(pixel.shape[-2:])
        return self._size_cache[key]

    @staticmethod
    def placeholders(processor, height: int, width: int) -> int:
        """`<image>` tokens `processor` writes for one processed image of this size."""
        return processor.num_placeholders(processor.num_encoder_tokens(height, width))

    # ------------------------------------------------------------------ encoding
    def encode(self, record: dict, processor, sizes: list[tuple[int, int]]) -> Encoding:
        """Token ids and labels of one record with `processor`'s placeholder counts (`sizes`: per image)."""
        counts = iter([self.placeholders(processor, h, w) for h, w in sizes])
        input_ids, labels = [], []
        for number, (text, is_answer) in enumerate(self.render_pieces(record["messages"], record["source"])):
            parts = text.split(IMAGE_TOKEN)
            expanded = parts[0] + "".join(IMAGE_TOKEN * next(counts) + part for part in parts[1:])
            ids = self.tokenizer(expanded, add_special_tokens=number == 0)["input_ids"]
            input_ids += ids
            labels += [i if is_answer and i != self.image_token_id else IGNORE_INDEX for i in ids]
        image_rows = [i for i, token in enumerate(input_ids) if token == self.image_token_id]
        first_answer = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        required = max(image_rows[-1] + 1 if image_rows else 0, first_answer + 1)
        return Encoding(input_ids, labels, required)

    def encodings(self, record: dict) -> list[Encoding]:
        """The compressed encoding, plus the full-token one when `full_processor` is set."""
        sizes = [self.processed_size(image) for image in record["images"]]
        processors = [self.processor] + ([self.full_processor] if self.full_processor is not None else [])
        return [self.encode(record, p, sizes) for p in processors]

    def required_length(self, record: dict) -> tuple[int, int]:
        """`(tokens a cut must keep, total tokens)` of the longer encoding: the dataset's too-long check."""
        longest = max(self.encodings(record), key=lambda e: len(e.input_ids))
        return longest.required, len(longest.input_ids)

    def _cut(self, encodings: list[Encoding], source: str) -> list[Encoding]:
        if self.max_length is None:
            return encodings
        excess = max(len(e.input_ids) for e in encodings) - self.max_length
        if excess <= 0:
            return encodings
        for e in encodings:
            if len(e.input_ids) - excess < e.required:
                raise ValueError(
                    f"{source}: needs {e.required} tokens up to its last image placeholder and first answer "
                    f"token but max_length is {self.max_length}; such rows are skipped when the dataset is "
                    "loaded with the same max_length"
                )
        return [Encoding(e.input_ids[:-excess], e.labels[:-excess], e.required) for e in encodings]

    def _pad(self, sequences: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)

    def __call__(self, records: list[dict]) -> dict:
        if not records:
            raise ValueError("cannot collate an empty batch")
        encoded = [self._cut(self.encodings(r), r["source"]) for r in records]
        batch = {}
        for slot, prefix in enumerate(["", "full_"][: len(encoded[0])]):
            ids = [e[slot].input_ids for e in encoded]
            batch[f"{prefix}input_ids"] = self._pad(ids, self.pad_token_id)
            batch[f"{prefix}attention_mask"] = self._pad([[1] * len(s) for s in ids], 0)
            batch[f"{prefix}labels"] = self._pad([e[slot].labels for e in encoded], IGNORE_INDEX)
        images = [image for r in records for image in r["images"]]
        if images:
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")[
                "pixel_values"
            ]
        return batch


__all__ = ["DeftLlavaDataCollator", "Encoding", "IGNORE_INDEX"]
