"""Output dataclasses of DeFT-LLaVA: LLaVA's outputs extended with what a user needs to inspect compression."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast


@dataclass
class DeftVisualFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features`/`get_video_features` output.

    pooler_output: list, per image (or video), of `(num_rows, hidden_size)` rows for its placeholders.
    source_indices: list, per image, of `(num_rows,)` long: the patch each row comes from (ascending).
    num_source_tokens: list, per image, of the encoder's token count N before compression.
    row_keep: list, per image, of `(num_rows,)` bool rows the language model sees, or None (all rows).
    row_fast: list, per image, of `(num_rows,)` bool rows kept by top-k (variable budgets only).
    compression_scores: `(num_images, N)` DeFT scores. mixture_weights: component -> weight.
    num_reconstructed: `(num_images,)` rows that RTD rebuilt. rtd_loss / feedback_loss: training losses.
    cls_embeddings: `(num_images, hidden_size)` the projected CLS token of the feature layer, and
    cls_attention: `(num_images, N)`, kept for a `"features_with_text"` method that runs in the forward.
    """

    source_indices: list | None = None
    num_source_tokens: list | None = None
    row_keep: list | None = None
    row_fast: list | None = None
    compression_scores: torch.Tensor | None = None
    mixture_weights: dict | None = None
    num_reconstructed: torch.Tensor | None = None
    rtd_loss: torch.Tensor | None = None
    feedback_loss: torch.Tensor | None = None
    cls_embeddings: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None


@dataclass
class DeftLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    """LLaVA inner output plus the compression bookkeeping.

    deft_position_ids: `(batch, seq)` position ids the language model used (gaps kept), or None.
    deft_attention_mask: `(batch, seq')` compacted mask after re-packing, or None when nothing was dropped.
    deft_gather_index: `(batch, seq')` index into the input sequence of every kept token (-1 on new padding).
    image_features_output / video_features_output: the `DeftVisualFeaturesOutput` used.
    deft_generation_state: forward keyword arguments that later decoding steps need (the prompt length a
        prompt-dependent method decided on, FastV's `deft_layer_gather_index`); `generate` passes them on.
    """

    deft_position_ids: torch.LongTensor | None = None
    deft_attention_mask: torch.LongTensor | None = None
    deft_gather_index: torch.LongTensor | None = None
    image_features_output: DeftVisualFeaturesOutput | None = None
    video_features_output: DeftVisualFeaturesOutput | None = None
    deft_kept_indices: list | None = None
    deft_num_reconstructed: torch.Tensor | None = None
    deft_compression_scores: torch.Tensor | None = None
    deft_generation_state: dict | None = None


@dataclass
class DeftLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    """LLaVA output plus what a user needs to inspect compression.

    kept_indices: list, per image (then per video), of `(num_rows,)` source patch indices of the visual
        tokens the language model saw (after the adaptive decision).
    compression_scores: `(num_images, N)`; mixture_weights: component -> weight.
    num_reconstructed: `(batch,)` visual tokens rebuilt by RTD per sample.
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
    deft_position_ids: torch.LongTensor | None = None
    deft_attention_mask: torch.LongTensor | None = None
    deft_gather_index: torch.LongTensor | None = None
    deft_generation_state: dict | None = None
