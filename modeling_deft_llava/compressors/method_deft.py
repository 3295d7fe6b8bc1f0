"""DeFT as a registered compression method: the seed's `DeFTModule` behind the model's hooks.

DeFT ("Decoupled and Feedback-Guided Tokenization", the seed README; stages in `modeling_deft_llava/deft/`)
scores the projected features of every image or video (SAM -> saliency, feedback and group scores -> learned
mixture), keeps the top K in their original order and, with the Recoverable Token Dictionary, may rebuild
pruned tokens. Its settings are the config's `deft_*` fields (the seed's config keys), not
`compression_settings`.

Inference modes (`deft_inference_mode`):
- `"fast"`: K rows per item; the processor writes K placeholders.
- `"hybrid"`: every row the RTD rule marks uncertain is rebuilt; the processor writes N placeholders, the model
  keeps the rows in `rows_used` and re-packs the batch.
- `"adaptive"`: a fast prefill; samples whose next-token distribution is uncertain (`reconsider`) get a second
  prefill with their rebuilt rows.

Text context (`compress_text`, `deft_text_retention_ratio`): the context tokens' input embeddings go through
the same `DeFTModule` with `modality="text"` (SAM, saliency, group score over the `deft_group_text_neighbors`
most similar context tokens of the same sample; feedback when trained with gradients is not wired for text),
and the top K of each sample's context tokens are kept in order, `fast` mode whatever `deft_inference_mode`.

Question-aware DeFT (`deft_question_aware`): the saliency reads the prompt's question (`QuestionEncoder`), so
the selection waits for the prompt: `compress_features` leaves the N rows (and records the grid and the
token gradients), and `compress_with_prompt` scores and selects with the question, the same way in every mode
(K placeholders in `fast`, N with `rows_used` otherwise). The question of an image is every real text token
of its row in the prompt, before or after it (`PromptBatch.questions`; answer tokens in training are never
read). In a multi-turn chat the image is compressed in the turn that brings it, with that turn's text: a
question asked in a later turn, after the image sits in the KV cache, cannot change which tokens were kept
(send the conversation again without `past_key_values` to re-select). A call of `get_image_features` alone
returns the N uncompressed rows (no prompt yet).

Differences from the seed README: see `DeFTModule`. For text: the RTD is not used (no reconstructed context
rows), and the scorers are the same weights that score visual tokens (one SAM for every modality, as the seed's
unified semantic space).
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import ClassVar

import torch

from ..deft.deft_module import DeFTModule
from ..deft.token_dictionary import sample_is_uncertain
from ..modeling_outputs_deft_llava import updated
from .compression_method import (
    CompressionMethod,
    NoSettings,
    PromptBatch,
    TextBatch,
    TextSelection,
    VisualBatch,
)

# DeFTModule attribute <- config key: read from the config at every call
CALL_TIME_SETTINGS = {
    "retention_ratio": "deft_retention_ratio",
    "alpha_var": "deft_alpha_var",
    "image_neighbors": "deft_group_image_neighbors",
    "video_window": "deft_group_video_window",
    "text_neighbors": "deft_group_text_neighbors",
    "entropy_threshold": "deft_rtd_entropy_threshold",
    "confidence_threshold": "deft_rtd_confidence_threshold",
    "feedback_loss_weight": "deft_feedback_loss_weight",
    "rtd_loss_weight": "deft_rtd_loss_weight",
    "score_components": "deft_score_components",
    "ranking_loss": "deft_ranking_loss",
    "ranking_temperature": "deft_ranking_temperature",
    "coverage_weight": "deft_coverage_weight",
}


@contextmanager
def loaded_weights(module: torch.nn.Module):
    """`module`'s own weights readable inside the block, also when it is offloaded.

    A model loaded with weights offloaded (`device_map` with `offload_folder`, or a `max_memory` that forces it)
    keeps a placeholder in `module.weight` outside the module's forward; the hook offloading installs on the
    module (accelerate's `AlignDevicesHook`, `module._hf_hook`) loads the real weights before the forward and
    puts the placeholder back after it. The same two calls run around the block; a module without an offload
    hook is left alone."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


class DeftLlavaDeFTCompressor(CompressionMethod, DeFTModule):
    """DeFT inside the model: a `DeFTModule` (same children, so checkpoints keep the keys `model.deft.*`)
    whose `compress_features` hook scores and selects the projected features of each image or video.

    `deft_token_gradients` (list, per item, of `(N, hidden_size)` task-loss gradients) enable the feedback
    score in training. Every `nn.Linear` a checkpoint lacks gets a load-independent initialisation (see
    `DeftLlavaPreTrainedModel._init_weights`): the seed of each layer is the CRC-32 of its name.
    """

    name = "deft"
    settings_class = NoSettings  # DeFT reads the deft_* config fields
    module_name = "deft"
    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "text")
    learns_from_feedback = True
    token_layouts = ("grid", "views")  # the group score takes each view's own 2-D neighbours

    @classmethod
    def writes_all_placeholders(cls, config) -> bool:
        # hybrid and adaptive keep a content-dependent number of rows
        return config.deft_inference_mode != "fast"

    @classmethod
    def parse_settings(cls, settings: dict | None):
        if settings:
            raise ValueError(
                f"compression_settings={settings!r} are settings of a baseline method and "
                "compression_method='deft' would ignore them; DeFT reads the deft_* fields "
                "(e.g. deft_retention_ratio). Leave compression_settings=None for 'deft'"
            )
        return NoSettings()

    @classmethod
    def check_config(cls, config, settings, num_tokens, num_kept) -> None:
        if config.use_deft and config.deft_inference_mode != "fast" and not config.deft_enable_rtd:
            raise ValueError(
                f"deft_inference_mode={config.deft_inference_mode!r} reconstructs pruned tokens and needs "
                "deft_enable_rtd=True"
            )

    @classmethod
    def from_config(cls, config) -> DeftLlavaDeFTCompressor:
        method = cls(
            token_dim=config.text_config.hidden_size,
            semantic_dim=config.deft_semantic_dim,
            enable_rtd=config.deft_enable_rtd,
            rtd_bottleneck_ratio=config.deft_rtd_bottleneck_ratio,
            saliency_hidden_dim=config.deft_saliency_hidden_dim,
            question_aware=config.deft_question_aware,
            position_aware=config.deft_position_aware,
            **{attribute: getattr(config, key) for attribute, key in CALL_TIME_SETTINGS.items()},
        )
        for name, module in method.named_modules():  # see DeftLlavaPreTrainedModel._init_weights
            module._deft_init_seed = zlib.crc32(name.encode())
        method.inference_mode = config.deft_inference_mode
        # question-aware DeFT decides from the prompt: later steps and a full recompute read the same prompt
        method.decides_on_prompt = method.question_aware
        return method

    def apply_config(self, config) -> None:
        for attribute, key in CALL_TIME_SETTINGS.items():
            setattr(self, attribute, getattr(config, key))
        self.inference_mode = config.deft_inference_mode

    def compress_features(self, features, visual: VisualBatch):
        if not features.pooler_output:
            return features
        if self.question_aware:  # selected once the prompt is known (`compress_with_prompt`)
            return updated(
                features,
                spatial_shape=tuple(visual.spatial_shape),
                token_gradients=visual.token_gradients,
            )
        return self._select(
            visual.input_embeddings, features, visual.modality, visual.spatial_shape, visual.token_gradients
        )

    def compress_with_prompt(self, features, prompt: PromptBatch):
        """Question-aware DeFT: score and select each item with its row's question (see the module docstring)."""
        if not self.question_aware:
            return features
        items = len(features.pooler_output)
        row, question = prompt.questions(
            int(prompt.placeholder_mask.sum()) // items
        )  # (items,), (items, seq)
        spatial_shape = features.spatial_shape
        if spatial_shape is None:
            raise ValueError(
                "question-aware DeFT got visual features without their patch grid (spatial_shape): pass the "
                "features that get_image_features / get_video_features of this model return"
            )
        return self._select(
            prompt.input_embeddings,
            features,
            prompt.modality,
            spatial_shape,
            features.token_gradients,
            question_embeds=prompt.inputs_embeds[row],  # (items, seq, D)
            question_mask=question,
        )

    def _select(
        self,
        embeddings,
        features,
        modality,
        spatial_shape,
        token_gradients,
        question_embeds=None,
        question_mask=None,
    ):
        """Score and select the rows of each item (`fast`: K rows; `hybrid`/`adaptive`: N rows, `rows_used`).
        `embeddings`: the language model's input embedding table (`hybrid` reads the tokens through it)."""
        tokens = torch.stack(list(features.pooler_output))  # (items, N, D)
        grads = torch.stack(token_gradients) if token_gradients is not None else None
        mode = self.inference_mode
        logits = None
        if mode == "hybrid":
            # the language model's own reading of each visual token through its vocabulary embedding
            if embeddings is None:
                raise ValueError(
                    "DeFT hybrid mode reads the language model's input embeddings; none were given"
                )
            with loaded_weights(embeddings):
                logits = tokens @ embeddings.weight.to(tokens.device).t()  # (items, N, vocab)
        out = self(
            tokens=tokens,
            modality=modality,
            spatial_shape=tuple(spatial_shape),
            inference_mode="fast" if mode == "fast" else "hybrid",
            logits=logits,
            token_gradients=grads,
            question_embeds=question_embeds,
            question_mask=question_mask,
        )
        result = updated(
            features,
            compression_scores=out.scores,
            mixture_weights=out.scoring_info["mixture_weights"],
            rtd_loss=out.rtd_loss,
            feedback_loss=out.feedback_loss,
            num_reconstructed=out.scoring_info["num_reconstructed"],
        )
        if mode == "fast":
            result.pooler_output = list(out.retained_tokens)  # K rows per item
            result.source_indices = list(out.kept_indices)
            return result
        return self._all_rows(result, tokens, out, mode)

    def _all_rows(self, result, tokens, out, mode):
        """Variable budget: all N rows; kept rows are the originals, RTD rows are decoded, the rest unused."""
        n = tokens.shape[1]
        selected = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (items, N)
        selected.scatter_(1, out.kept_indices, True)
        rows = torch.where(selected.unsqueeze(-1), tokens, torch.zeros_like(tokens))  # (items, N, D)
        usable = selected.clone()
        if out.reconstructed_tokens is not None:
            # unused reconstruction slots point at a dump column n, dropped after the scatter
            idx = out.reconstructed_indices.masked_fill(~out.reconstructed_mask, n)  # (items, r)
            padded = torch.cat(
                [rows, rows.new_zeros(rows.shape[0], 1, rows.shape[2])], dim=1
            )  # (items, N+1, D)
            padded.scatter_(
                1, idx.unsqueeze(-1).expand(-1, -1, rows.shape[2]), out.reconstructed_tokens.to(rows.dtype)
            )
            rows = padded[:, :n]
            flags = torch.cat([usable, usable.new_zeros(usable.shape[0], 1)], dim=1)  # (items, N+1)
            flags.scatter_(1, idx, True)
            usable = flags[:, :n]
        result.pooler_output = list(rows)
        result.rows_selected = list(selected)
        # hybrid uses every usable row at once; adaptive starts from the selected rows and may add the rest
        result.rows_used = list(usable) if mode == "hybrid" else list(selected)
        return result

    def compress_text(self, text: TextBatch) -> TextSelection:
        """Keep the top `deft_text_retention_ratio` of each sample's context tokens (DeFT's text path).

        Samples without context are left out of the call (`DeFTModule` refuses an all-padding row)."""
        has = text.token_mask.any(1)  # (batch,)
        batch, n = text.token_mask.shape
        kept = torch.zeros(
            batch, n + 1, dtype=torch.bool, device=text.tokens.device
        )  # column n: unused slots
        rows = text.tokens.clone()
        scores = torch.full((batch, n), float("-inf"), device=text.tokens.device)
        if bool(has.any()):
            out = self(
                tokens=text.tokens[has],
                modality="text",
                inference_mode="fast",
                attention_mask=text.token_mask[has],
                retention_ratio=text.retention_ratio,
            )
            slots = out.kept_indices.masked_fill(~out.kept_mask, n)  # (samples, k)
            kept[has] = kept[has].scatter(1, slots, True)
            # the retained rows carry DeFT's straight-through gate (1 in value): the task loss reaches the scorers
            padded = torch.cat([rows[has], rows.new_zeros(int(has.sum()), 1, rows.shape[-1])], dim=1)
            padded = padded.scatter(
                1, slots.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), out.retained_tokens.to(rows.dtype)
            )  # (samples, n + 1, D)
            rows[has] = padded[:, :n]
            scores[has] = out.scores.float()
        return TextSelection(kept=kept[:, :n], tokens=rows, scores=scores)

    def reconsider(self, next_token_logits) -> torch.Tensor | None:
        """`adaptive`: samples whose next-token distribution is uncertain (the RTD rule: normalised entropy >
        `deft_rtd_entropy_threshold` or max probability < `deft_rtd_confidence_threshold`)."""
        if self.inference_mode != "adaptive":
            return None
        return sample_is_uncertain(next_token_logits(), self.entropy_threshold, self.confidence_threshold)


__all__ = ["DeftLlavaDeFTCompressor"]
