"""Output dataclasses of DeFT-LLaVA: LLaVA's outputs extended with what a user needs to inspect compression."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, fields

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast


@dataclass
class DeftVisualFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features`/`get_video_features` output: one entry per image (or video), "item" below.

    pooler_output: list, per item, of `(num_rows, hidden_size)` rows for its placeholders.
    source_indices: list, per item, of `(num_rows,)` long: the patch each row comes from (ascending).
    num_source_tokens: list, per item, of the encoder's token count N before compression.
    rows_used: list, per item, of `(num_rows,)` bool rows the language model sees, or None (all rows); the
        model drops the other placeholders and re-packs the batch (content-dependent counts).
    rows_selected: list, per item, of `(num_rows,)` bool rows chosen by top-k; `rows_used` may add rows that
        the token dictionary rebuilt (DeFT `hybrid`/`adaptive`).
    compression_scores: `(items, N)` the scores the method ranked by. mixture_weights: component -> weight.
    num_reconstructed: `(items,)` rows that RTD rebuilt. rtd_loss / feedback_loss: DeFT's training losses.
    cls_embeddings: `(items, hidden_size)` the projected CLS token of the feature layer, and
    cls_attention: `(items, N)`, kept for a method that compresses once the prompt is known.
    spatial_shape: `(rows, cols)` patch grid of one image or frame (shared by every item), and
    token_gradients: list, per item, of `(N, hidden_size)` feedback gradients, kept for question-aware DeFT,
        which selects once the prompt is known.
    projector_inputs: list, per item, of `(N, vision_width)` the features that entered the projector, kept for
        a method that merges before the projector once the prompt is known (Recoverable's released order).

    Every field after `attentions` is per item (a list or a tensor whose first dimension is the item):
    `select_items` reorders them all (beam search), so a new per-item field needs no other code.
    """

    source_indices: list | None = None
    num_source_tokens: list | None = None
    rows_used: list | None = None
    rows_selected: list | None = None
    compression_scores: torch.Tensor | None = None
    mixture_weights: dict | None = None
    num_reconstructed: torch.Tensor | None = None
    rtd_loss: torch.Tensor | None = None
    feedback_loss: torch.Tensor | None = None
    cls_embeddings: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    spatial_shape: tuple | None = None  # shared by every item: a tuple, which `select_items` leaves alone
    token_gradients: list | None = None
    projector_inputs: list | None = None

    # fields of the encoder itself, not per item
    ENCODER_FIELDS = ("last_hidden_state", "hidden_states", "attentions")

    def select_items(self, order: list[int]) -> None:
        """Reorder (and repeat) the items in place: item `order[i]` becomes item i, in every per-item field
        (`pooler_output` included). Dicts (`mixture_weights`) and scalars (losses) are shared by all items."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.ENCODER_FIELDS or value is None:
                continue
            if isinstance(value, list):
                setattr(self, f.name, [value[i] for i in order])
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                setattr(self, f.name, value[torch.tensor(order, device=value.device)])


def updated(output, **values):
    """A shallow copy of a `ModelOutput` with some fields replaced."""
    new = copy.copy(output)
    for key, value in values.items():
        setattr(new, key, value)
    return new


# What compression reports: one set of fields under one set of names, those of the output users read
# (`DeftLlavaCausalLMOutputWithPast`). The inner output (`DeftLlavaModelOutputWithPast`) carries the same fields,
# and the outer forward takes them all in one step (`compression_report`), never one by one.
COMPRESSION_REPORT_FIELDS = (
    "kept_indices",
    "compression_scores",
    "mixture_weights",
    "num_reconstructed",
    "text_kept_indices",
    "deft_position_ids",
    "deft_attention_mask",
    "deft_gather_index",
    "deft_generation_state",
)


def compression_report(output) -> dict:
    """`{field: value}` of what compression reports (`COMPRESSION_REPORT_FIELDS`), read from `output`."""
    return {name: getattr(output, name) for name in COMPRESSION_REPORT_FIELDS}


def _renamed(old: str, new: str) -> property:
    """A deprecated attribute name that reads and writes `new` (with a FutureWarning naming it)."""

    def warn():
        warnings.warn(
            f"DeftLlavaModelOutputWithPast.{old} is deprecated; use .{new} (the name of the model's output)",
            FutureWarning,
            stacklevel=3,
        )

    def get(self):
        warn()
        return getattr(self, new)

    def set_(self, value):
        warn()
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of `{new}`.")


@dataclass
class DeftLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    """LLaVA inner output plus what compression reports (`COMPRESSION_REPORT_FIELDS`, the fields of
    `DeftLlavaCausalLMOutputWithPast` under the same names).

    deft_position_ids: `(batch, seq)` position ids the language model used (gaps kept), or None.
    deft_attention_mask: `(batch, seq')` compacted mask after re-packing, or None when nothing was dropped.
    deft_gather_index: `(batch, seq')` index into the input sequence of every kept token (-1 on new padding).
    image_features_output / video_features_output: the `DeftVisualFeaturesOutput` used.
    kept_indices, num_reconstructed, compression_scores, mixture_weights, text_kept_indices: see
        `DeftLlavaCausalLMOutputWithPast` (until 0.1.0 named `deft_kept_indices`, `deft_num_reconstructed`,
        `deft_compression_scores`, `deft_text_kept_indices`: those names still work, with a FutureWarning).
    deft_generation_state: an opaque record of what later steps of `generate` need (the prompt length a
        prompt-dependent method decided on, and whatever the method itself carries); the model and `generate`
        pass it on whole (`deft_generation_state=` of `forward`), and only the method reads its own entries.
    """

    deft_position_ids: torch.LongTensor | None = None
    deft_attention_mask: torch.LongTensor | None = None
    deft_gather_index: torch.LongTensor | None = None
    image_features_output: DeftVisualFeaturesOutput | None = None
    video_features_output: DeftVisualFeaturesOutput | None = None
    kept_indices: list | None = None
    num_reconstructed: torch.Tensor | None = None
    compression_scores: torch.Tensor | None = None
    deft_generation_state: dict | None = None
    text_kept_indices: list | None = None
    mixture_weights: dict | None = None

    deft_kept_indices = _renamed("deft_kept_indices", "kept_indices")
    deft_num_reconstructed = _renamed("deft_num_reconstructed", "num_reconstructed")
    deft_compression_scores = _renamed("deft_compression_scores", "compression_scores")
    deft_text_kept_indices = _renamed("deft_text_kept_indices", "text_kept_indices")


@dataclass
class DeftLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    """LLaVA output plus what a user needs to inspect compression.

    kept_indices: list, per image (then per video), of `(num_rows,)` source patch indices of the visual
        tokens the language model saw (after the adaptive decision).
    compression_scores: `(num_images, N)`; mixture_weights: component -> weight.
    num_reconstructed: `(batch,)` visual tokens rebuilt by RTD per sample.
    text_kept_indices: list, per sample, of the input positions of the `<context>` tokens the language model
        saw (`text_context.py`), or None when the input holds no context.
    lm_loss: next-token loss alone. In training mode `loss = lm_loss + deft_rtd_loss_weight * rtd_loss +
        deft_feedback_loss_weight * feedback_loss` (each term present only when computed).
    deft_position_ids / deft_attention_mask / deft_gather_index / deft_generation_state: see
        `DeftLlavaModelOutputWithPast`.
    """

    lm_loss: torch.Tensor | None = None
    rtd_loss: torch.Tensor | None = None
    feedback_loss: torch.Tensor | None = None
    kept_indices: list | None = None
    compression_scores: torch.Tensor | None = None
    mixture_weights: dict | None = None
    num_reconstructed: torch.Tensor | None = None
    text_kept_indices: list | None = None
    deft_position_ids: torch.LongTensor | None = None
    deft_attention_mask: torch.LongTensor | None = None
    deft_gather_index: torch.LongTensor | None = None
    deft_generation_state: dict | None = None
