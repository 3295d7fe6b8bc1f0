"""`DeFTModule`: the seed's standalone DeFT compressor (SAM -> FGCS -> top-k -> RTD) for any modality.

Paper: "DeFT: Decoupled and Feedback-Guided Tokenization for Efficient Multimodal Long-Context Modeling"
(seed README in `shared/seeds/deft-readme.md`). Every default comes from `configuration/deft_settings.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ..configuration.deft_settings import (
    DEFAULTS,
    INFERENCE_MODES,
    MODALITIES,
    validate_deft_settings,
    validate_inference_mode,
    validate_retention_ratio,
)
from .deft_inputs import (
    check_attention_mask,
    check_logits,
    check_question,
    check_task_loss,
    check_token_gradients,
    check_tokens,
)
from .feedback_scorer import feedback_scores, feedback_scores_from_gradients
from .group_scorer import grid_views, group_scores
from .question_conditioning import GridPositionEncoding, QuestionEncoder
from .ranking_loss import ranking_loss
from .saliency_scorer import SaliencyScorer
from .score_mixer import ScoreMixer, normalize_per_sample
from .semantic_abstraction import SemanticAbstraction
from .token_dictionary import TokenDictionary, is_uncertain, sample_is_uncertain
from .topk_selector import gather_tokens, select_topk, select_with_coverage

COMPONENT_KEYS = {"semantic": "s_sem", "feedback": "s_fb", "group": "s_group"}


@dataclass
class DeFTOutput:
    """What `DeFTModule` returns; reads both as `out.retained_tokens` and as `out["retained_tokens"]`.

    Attributes:
        retained_tokens: `(batch_size, k, token_dim)` kept tokens in their original order (slots beyond a
            padded row's own k are zeros; see `kept_mask`).
        reconstructed_tokens: `(batch_size, r, token_dim)` RTD reconstructions of pruned tokens, in original
            order, or None when nothing was reconstructed (`fast`, RTD off, or every sample certain).
        kept_indices: `(batch_size, k)` positions of the kept tokens in the input, ascending.
        kept_mask: `(batch_size, k)` bool, False on unused slots of padded rows.
        reconstructed_indices / reconstructed_mask: `(batch_size, r)` positions and validity of the
            reconstructed tokens (None when `reconstructed_tokens` is None).
        scores: `(batch_size, num_tokens)` the mixed score used for selection (padding gets -inf).
        scoring_info: `mixture_weights` (component -> weight of the present components), the normalised
            components `s_sem`, `s_fb` (None without feedback), `s_group` (None when `score_components` leaves it
            out: it is not computed), and `num_kept` per sample.
        rtd_loss: reconstruction loss of the pruned tokens (None without RTD, and at inference: in eval mode
            with gradients off nothing can use it, so the pruned tokens are not encoded for it).
        feedback_loss: the ranking loss (`deft_ranking_loss`: the seed's MSE, or ListNet) pulling the scores (the
            inference-time semantic + group mixture, and the training-time mixture) towards the normalised
            `s_fb` (None without feedback).
    """

    retained_tokens: torch.Tensor
    reconstructed_tokens: torch.Tensor | None
    kept_indices: torch.Tensor
    kept_mask: torch.Tensor
    scores: torch.Tensor
    scoring_info: dict
    reconstructed_indices: torch.Tensor | None = None
    reconstructed_mask: torch.Tensor | None = None
    rtd_loss: torch.Tensor | None = None
    feedback_loss: torch.Tensor | None = None

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(f"{key!r} is not a DeFT output; valid keys: {self.keys()}")
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))


class DeFTModule(nn.Module):
    """Decoupled, feedback-guided token compression for image, video and text tokens.

    Args:
        token_dim: width of the tokens to compress.
        semantic_dim: width of the semantic space of SAM.
        retention_ratio: share of tokens kept, in (0, 1].
        enable_rtd: build the Recoverable Token Dictionary.
        alpha_var: variance penalty of the feedback score.
        rtd_bottleneck_ratio: RTD codes have `token_dim // rtd_bottleneck_ratio` features.
        saliency_hidden_dim, image_neighbors, video_window, text_neighbors: see `DeftSettings`.
        entropy_threshold, confidence_threshold: the RTD rule (see `token_dictionary.py`).
        score_components: the components the mixture may use (None: every component present in the call; see
            `DeftSettings.deft_score_components`).
        feedback_loss_weight, rtd_loss_weight: recorded for training code; the module returns the raw losses.
        question_aware: build the `QuestionEncoder`; a call with `question_embeds` then conditions the saliency
            on the question (a call without one scores as the seed).
        position_aware: build the `GridPositionEncoding` (images and videos; text has no grid).
        ranking_loss, ranking_temperature: the feedback loss (`ranking_loss.py`).
        coverage_weight: redundancy penalty of the selection (0: plain top-k; see `select_with_coverage`).

    Every new argument defaults to the seed's behaviour (`DeftSettings`); the shipped checkpoints use
    `DEFT_RECIPE` (question- and position-aware, ListNet).

    Tokens may have any floating dtype: the scorers and the RTD run in the dtype of their own weights (the
    tokens are cast to it), and retained and reconstructed tokens come back in the tokens' dtype.

    Differences from the paper:
    - The feedback gradient is taken against the tokens given to this module (the encoder's tokens `x`), not
      against `z = SAM(x)`: the task loss is computed before this call, so it cannot depend on this call's `z`.
    - Top-k has no gradient; the retained tokens are multiplied by `1 + s_i - stopgrad(s_i)` (value exactly 1)
      so the task loss still reaches the scorers and SAM (straight-through estimator). The mixture weights
      are detached on that path and learn from the feedback loss, which fits the mixed score to `s_fb`.
    """

    # read by transformers from every child of a model (`PreTrainedModel.post_init`), so a DeFT-LLaVA model names
    # `score_mixer` only when it holds this module: the mixture logits stay float32 when loading in float16 (a
    # large logit would overflow and make the mixture NaN; bf16 has the float32 range); the mixer also computes its
    # softmax in float32
    _keep_in_fp32_modules = ["score_mixer"]

    def __init__(
        self,
        token_dim: int,
        semantic_dim: int = DEFAULTS.deft_semantic_dim,
        retention_ratio: float = DEFAULTS.deft_retention_ratio,
        enable_rtd: bool = DEFAULTS.deft_enable_rtd,
        alpha_var: float = DEFAULTS.deft_alpha_var,
        rtd_bottleneck_ratio: int = DEFAULTS.deft_rtd_bottleneck_ratio,
        saliency_hidden_dim: int = DEFAULTS.deft_saliency_hidden_dim,
        image_neighbors: int = DEFAULTS.deft_group_image_neighbors,
        video_window: int = DEFAULTS.deft_group_video_window,
        text_neighbors: int = DEFAULTS.deft_group_text_neighbors,
        entropy_threshold: float = DEFAULTS.deft_rtd_entropy_threshold,
        confidence_threshold: float = DEFAULTS.deft_rtd_confidence_threshold,
        feedback_loss_weight: float = DEFAULTS.deft_feedback_loss_weight,
        rtd_loss_weight: float = DEFAULTS.deft_rtd_loss_weight,
        score_components: tuple[str, ...] | list[str] | None = DEFAULTS.deft_score_components,
        question_aware: bool = DEFAULTS.deft_question_aware,
        position_aware: bool = DEFAULTS.deft_position_aware,
        ranking_loss: str = DEFAULTS.deft_ranking_loss,
        ranking_temperature: float = DEFAULTS.deft_ranking_temperature,
        coverage_weight: float = DEFAULTS.deft_coverage_weight,
    ):
        super().__init__()
        if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"token_dim must be a positive int, got {token_dim!r}")
        validate_deft_settings(
            deft_semantic_dim=semantic_dim,
            deft_retention_ratio=retention_ratio,
            deft_enable_rtd=enable_rtd,
            deft_alpha_var=alpha_var,
            deft_rtd_bottleneck_ratio=rtd_bottleneck_ratio,
            deft_saliency_hidden_dim=saliency_hidden_dim,
            deft_group_image_neighbors=image_neighbors,
            deft_group_video_window=video_window,
            deft_group_text_neighbors=text_neighbors,
            deft_rtd_entropy_threshold=entropy_threshold,
            deft_rtd_confidence_threshold=confidence_threshold,
            deft_feedback_loss_weight=feedback_loss_weight,
            deft_rtd_loss_weight=rtd_loss_weight,
            deft_score_components=score_components,
            deft_question_aware=question_aware,
            deft_position_aware=position_aware,
            deft_ranking_loss=ranking_loss,
            deft_ranking_temperature=ranking_temperature,
            deft_coverage_weight=coverage_weight,
        )
        self.token_dim = token_dim
        self.retention_ratio = float(retention_ratio)
        self.alpha_var = float(alpha_var)
        self.image_neighbors = image_neighbors
        self.video_window = video_window
        self.text_neighbors = text_neighbors
        self.entropy_threshold = float(entropy_threshold)
        self.confidence_threshold = float(confidence_threshold)
        self.feedback_loss_weight = float(feedback_loss_weight)
        self.rtd_loss_weight = float(rtd_loss_weight)
        self.score_components = score_components
        self.ranking_loss = ranking_loss
        self.ranking_temperature = float(ranking_temperature)
        self.coverage_weight = float(coverage_weight)
        self.semantic_abstraction = SemanticAbstraction(token_dim, semantic_dim)
        self.saliency_scorer = SaliencyScorer(semantic_dim, saliency_hidden_dim)
        self.score_mixer = ScoreMixer()
        self.token_dictionary = TokenDictionary(token_dim, rtd_bottleneck_ratio) if enable_rtd else None
        self.question_encoder = (
            QuestionEncoder(token_dim, semantic_dim, saliency_hidden_dim) if question_aware else None
        )
        self.position_encoding = GridPositionEncoding(semantic_dim) if position_aware else None

    @property
    def question_aware(self) -> bool:
        return self.question_encoder is not None

    @property
    def enable_rtd(self) -> bool:
        return self.token_dictionary is not None

    # ------------------------------------------------------------------ input checks
    def _check_inputs(
        self,
        tokens,
        modality,
        spatial_shape,
        inference_mode,
        logits,
        attention_mask,
        retention_ratio,
        task_loss=None,
        token_gradients=None,
    ):
        check_tokens(tokens, self.token_dim)
        n = tokens.shape[1]
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        validate_inference_mode(inference_mode, name="inference_mode")
        if retention_ratio is not None:
            validate_retention_ratio(retention_ratio, name="retention_ratio")
        views = grid_views(spatial_shape) if modality == "image" else None
        if views is not None:  # an image of several views (AnyRes)
            if not all(r > 0 and c > 0 for r, c in views) or sum(r * c for r, c in views) != n:
                raise ValueError(
                    f"spatial_shape {views} (views of (rows, cols) patches) must hold the {n} tokens, got "
                    f"{sum(r * c for r, c in views)}"
                )
        elif modality in ("image", "video"):
            if (
                spatial_shape is None
                or len(tuple(spatial_shape)) != 2
                or not all(isinstance(s, int) and s > 0 for s in spatial_shape)
            ):
                raise ValueError(
                    f"modality={modality!r} needs spatial_shape=(rows, cols) of positive ints, got {spatial_shape!r}"
                )
            frame = spatial_shape[0] * spatial_shape[1]
            if modality == "image" and frame != n:
                raise ValueError(
                    f"spatial_shape {tuple(spatial_shape)} holds {frame} patches but tokens have {n} tokens"
                )
            if modality == "video" and n % frame != 0:
                raise ValueError(
                    f"video tokens ({n}) must be a whole number of frames of spatial_shape "
                    f"{tuple(spatial_shape)} = {frame} patches"
                )
        if attention_mask is not None:
            check_attention_mask(attention_mask, tokens, modality)
        if token_gradients is not None:
            check_token_gradients(token_gradients, tokens)
        if task_loss is not None:
            check_task_loss(task_loss, tokens, token_gradients)
        if logits is not None:
            check_logits(logits, tokens)
        if inference_mode == "adaptive" and logits is None:
            raise ValueError("inference_mode='adaptive' decides from the model's uncertainty: pass logits")
        if inference_mode != "fast" and not self.enable_rtd:
            raise ValueError(
                f"inference_mode={inference_mode!r} reconstructs pruned tokens and needs enable_rtd=True; "
                f"use inference_mode='fast' or build the module with enable_rtd=True"
            )

    # ------------------------------------------------------------------ stages
    def score(
        self,
        tokens: torch.Tensor,
        modality: str,
        spatial_shape=None,
        token_mask: torch.Tensor | None = None,
        task_loss: torch.Tensor | None = None,
        token_gradients: torch.Tensor | None = None,
        question_embeds: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """SAM + FGCS: mixed scores `(batch, N)` (padding -inf) and the scoring details (`semantic`: SAM's
        tokens `(batch, N, semantic_dim)`)."""
        semantic = self.semantic_abstraction(tokens)  # (batch, N, semantic_dim)
        located = semantic
        if self.position_encoding is not None and modality in ("image", "video"):
            located = semantic + self.position_encoding(
                tuple(spatial_shape), tokens.shape[1]
            )  # (batch, N, S)
        film = None
        if self.question_encoder is not None and question_embeds is not None:
            film = self.question_encoder(question_embeds, question_mask)  # 2 x (batch, hidden)
        s_sem = normalize_per_sample(self.saliency_scorer(located, film), token_mask)  # (batch, N)
        s_fb = None
        if token_gradients is not None:
            s_fb = normalize_per_sample(
                feedback_scores_from_gradients(token_gradients, self.alpha_var), token_mask
            )
        elif task_loss is not None:
            s_fb = normalize_per_sample(feedback_scores(task_loss, tokens, self.alpha_var), token_mask)
        s_group = None  # computed only when the mixture may use it (`score_components`)
        if self.score_components is None or "group" in self.score_components:
            s_group = normalize_per_sample(
                group_scores(
                    semantic,
                    s_sem,
                    modality,
                    tuple(spatial_shape) if spatial_shape is not None else None,
                    token_mask,
                    image_neighbors=self.image_neighbors,
                    video_window=self.video_window,
                    text_neighbors=self.text_neighbors,
                ),
                token_mask,
            )
        components = self._allowed({"semantic": s_sem, "feedback": s_fb, "group": s_group})
        mixed, beta = self.score_mixer(components)
        if not bool(torch.isfinite(mixed if token_mask is None else mixed[token_mask]).all()):
            # never hand NaN/inf to the top-k: it would silently keep arbitrary tokens
            bad = [
                name for name, c in components.items() if c is not None and not bool(torch.isfinite(c).all())
            ]
            raise ValueError(
                f"DeFT scores are not finite (component(s) {bad}; tokens {tuple(tokens.shape)} {tokens.dtype}, "
                f"DeFT weights {self.semantic_abstraction.fc1.weight.dtype}): check token_gradients for "
                "NaN/inf, and run the DeFT module in float32 or bfloat16 if float16 overflows"
            )
        if token_mask is not None:
            mixed = mixed.masked_fill(~token_mask, float("-inf"))
        info = {
            "mixture_weights": beta,
            "s_sem": s_sem,
            "s_fb": s_fb,
            "s_group": s_group,
            "semantic": semantic,
        }
        return mixed, info

    def _allowed(self, components: dict) -> dict:
        """`components` with those outside `score_components` set to None (all of them when it is None).

        Raises:
            ValueError: no listed component is present (e.g. only "feedback" without gradients)."""
        if self.score_components is None:
            return components
        allowed = {name: (c if name in self.score_components else None) for name, c in components.items()}
        if all(c is None for c in allowed.values()):
            present = [name for name, c in components.items() if c is not None]
            raise ValueError(
                f"score_components={list(self.score_components)} leaves no score component in this call (present: "
                f"{present}); the feedback score exists only with task_loss or token_gradients (training)"
            )
        return allowed

    def forward(
        self,
        tokens: torch.Tensor,
        modality: str = "image",
        spatial_shape: tuple[int, int] | None = None,
        inference_mode: str = DEFAULTS.deft_inference_mode,
        task_loss: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_gradients: torch.Tensor | None = None,
        retention_ratio: float | None = None,
        question_embeds: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
    ) -> DeFTOutput:
        """Compress `tokens` `(batch_size, num_tokens, token_dim)`.

        Args:
            modality: "image", "video" or "text".
            spatial_shape: `(rows, cols)` patch grid of an image, or of one video frame.
            inference_mode: "fast", "hybrid" or "adaptive" (see `token_dictionary.py` for the exact rule).
            task_loss: finite scalar loss computed from `tokens`; enables `s_fb` (gradient against `tokens`).
            logits: `(batch, V)` or `(batch, N, V)` predictions that drive RTD reconstruction (`-inf` marks an
                impossible word; NaN and `+inf` are refused).
            attention_mask: `(batch, N)` of 0/1 (or bool), 1 on real tokens and 0 on padding (text only).
            token_gradients: precomputed `d loss / d tokens`, exactly the shape of `tokens`, instead of
                `task_loss` (not both).
            retention_ratio: override of the module's ratio for this call.
            question_embeds: `(batch, T, token_dim)` embeddings of each sample's question tokens (for a
                DeFT-LLaVA model: the language model's input embeddings of the prompt), with `question_mask`
                `(batch, T)` bool, True on the question's tokens. Read only by a `question_aware` module.

        Raises:
            TypeError / ValueError: an argument of the wrong type, dtype, shape (named with the shape `tokens`
                call for), device, or with non-finite values (see `deft_inputs.py`).
        """
        self._check_inputs(
            tokens,
            modality,
            spatial_shape,
            inference_mode,
            logits,
            attention_mask,
            retention_ratio,
            task_loss,
            token_gradients,
        )
        ratio = self.retention_ratio if retention_ratio is None else float(retention_ratio)
        token_mask = attention_mask.bool() if attention_mask is not None else None
        if question_embeds is not None:
            check_question(question_embeds, question_mask, tokens, self.token_dim)
        scores, info = self.score(
            tokens,
            modality,
            spatial_shape,
            token_mask,
            task_loss,
            token_gradients,
            question_embeds,
            question_mask,
        )
        semantic = info.pop("semantic")
        feedback_loss = self._feedback_loss(info, scores, token_mask) if info["s_fb"] is not None else None

        if self.coverage_weight > 0:
            kept_indices, kept_mask = select_with_coverage(
                scores.detach(), semantic.detach(), ratio, self.coverage_weight, token_mask
            )  # (batch, k)
        else:
            kept_indices, kept_mask = select_topk(scores, ratio, token_mask)  # (batch, k)
        retained = gather_tokens(tokens, kept_indices)  # (batch, k, D)
        if ratio >= 1.0 and token_mask is None:
            retained = tokens  # keep-all: the input itself, untouched
        elif torch.is_grad_enabled() and scores.requires_grad:
            # the task loss reaches SAM and the scorers, not the mixture weights: scaling kept tokens up says
            # nothing about which component ranks tokens well (measured: it collapsed the mixture onto one
            # component); the mixture learns from the feedback loss instead
            beta = {name: weight.detach() for name, weight in info["mixture_weights"].items()}
            gate_scores = sum(beta[name] * info[COMPONENT_KEYS[name]] for name in beta)
            kept_scores = torch.gather(gate_scores, 1, kept_indices).masked_fill(~kept_mask, 0.0)
            gate = 1.0 + (kept_scores - kept_scores.detach())  # exactly 1, gradient d/ds
            retained = retained * gate.unsqueeze(-1).to(retained.dtype)
        if not bool(kept_mask.all()):
            retained = retained * kept_mask.unsqueeze(-1).to(retained.dtype)
        info["num_kept"] = kept_mask.sum(1)
        info["scores"] = scores

        reconstructed = rec_idx = rec_mask = rtd_loss = None
        if self.enable_rtd:
            pruned_mask = pruned_token_mask(
                kept_indices, kept_mask, tokens.shape[1], token_mask
            )  # (batch, N)
            if bool(pruned_mask.any()) and (self.training or torch.is_grad_enabled()):
                # a training loss: inference (eval mode, gradients off) does not encode every pruned token
                rtd_loss = self.token_dictionary.reconstruction_loss(tokens, pruned_mask)
            recover = self._recover_mask(inference_mode, logits, pruned_mask, token_mask)
            if recover is not None and bool(recover.any()):
                reconstructed, rec_idx, rec_mask = self._reconstruct(tokens, recover)
        info["num_reconstructed"] = (
            rec_mask.sum(1) if rec_mask is not None else torch.zeros_like(info["num_kept"])
        )
        return DeFTOutput(
            retained_tokens=retained,
            reconstructed_tokens=reconstructed,
            kept_indices=kept_indices,
            kept_mask=kept_mask,
            scores=scores,
            scoring_info=info,
            reconstructed_indices=rec_idx,
            reconstructed_mask=rec_mask,
            rtd_loss=rtd_loss,
            feedback_loss=feedback_loss,
        )

    def _feedback_loss(self, info, scores, token_mask) -> torch.Tensor:
        """Pull the scores towards the task feedback `s~_fb` (`ranking_loss`: the seed's MSE on per-sample
        normalised scores, or ListNet): the score used at inference (semantic + group mixture, where no feedback
        exists) and the training-time score (all three components). SAM, the saliency MLP (and its question and
        position inputs) and every mixture weight learn from it."""
        target = info["s_fb"]
        terms = [scores]  # `ranking_loss` normalises each term per sample
        inference = {"semantic": info["s_sem"], "group": info["s_group"]}
        if self.score_components is not None:
            inference = {name: c for name, c in inference.items() if name in self.score_components}
        if (
            inference
        ):  # no inference-time component listed (`score_components=["feedback"]`): training mix only
            inference_mix, _ = self.score_mixer(inference)
            terms.insert(0, inference_mix)
        return sum(
            ranking_loss(term, target, token_mask, self.ranking_loss, self.ranking_temperature)
            for term in terms
        )

    # ------------------------------------------------------------------ RTD
    def _recover_mask(self, mode, logits, pruned_mask, token_mask):
        """`(batch, N)` pruned tokens to reconstruct under `mode`, or None for `fast`."""
        if mode == "fast":
            return None
        if mode == "hybrid":
            if logits is None:
                return pruned_mask
            flags = is_uncertain(logits, self.entropy_threshold, self.confidence_threshold)
            return pruned_mask & (flags if flags.dim() == 2 else flags.unsqueeze(1))
        flags = sample_is_uncertain(logits, self.entropy_threshold, self.confidence_threshold, token_mask)
        return pruned_mask & flags.unsqueeze(1)

    def _reconstruct(self, tokens, recover):
        """Decode the tokens flagged in `recover` `(batch, N)` -> padded `(batch, r_max, D)`, indices, mask."""
        n = tokens.shape[1]
        counts = recover.sum(1)
        r_max = int(counts.max())
        # ascending positions of the flagged tokens, unflagged pushed to the end
        position = torch.arange(n, device=tokens.device).expand_as(recover)
        order = position.masked_fill(~recover, n).sort(dim=1).values[:, :r_max]  # (batch, r_max)
        rec_mask = order < n
        rec_idx = order.masked_fill(~rec_mask, 0)
        codes = self.token_dictionary.encode(gather_tokens(tokens, rec_idx))  # (batch, r_max, code_dim)
        rebuilt = self.token_dictionary.decode(codes).to(tokens.dtype) * rec_mask.unsqueeze(-1).to(
            tokens.dtype
        )
        return rebuilt, rec_idx, rec_mask


def pruned_token_mask(kept_indices, kept_mask, num_tokens, token_mask=None) -> torch.Tensor:
    """`(batch, N)` True on valid tokens that top-k did not keep.

    Unused slots of padded rows point at index 0 with `kept_mask` False; `scatter_add_` of the mask (not a
    plain scatter, whose result for duplicate indices is undefined) marks only the slots really used."""
    hits = torch.zeros(kept_indices.shape[0], num_tokens, dtype=torch.long, device=kept_indices.device)
    hits.scatter_add_(1, kept_indices, kept_mask.long())
    pruned = hits == 0
    if token_mask is not None:
        pruned &= token_mask
    return pruned


__all__ = ["DeFTModule", "DeFTOutput", "INFERENCE_MODES", "MODALITIES", "pruned_token_mask"]
