"""Recoverable Compression: text-guided visual token recovery (https://arxiv.org/abs/2409.01179)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_outputs_deft_llava import updated
from .compression_method import PromptBatch, VisualBatch
from .token_compressor import (
    CompressionContext,
    CompressionResult,
    TokenCompressor,
    check_choice,
    check_range,
    gather_tokens,
    sort_by_index,
)
from .vision_attention import cls_attention

VISUAL_SCORES = ("cls_similarity", "cls_attention")
CLUSTER_MERGES = ("released", "mean")
CLS_ATTENTION_LAYERS = ("feature_layer", "released")
MERGE_SPACES = ("vision", "projected")


@dataclass(frozen=True)
class RecoverableSettings:
    """Settings of Recoverable Compression.

    Args:
        visual_score: what ranks patches in the visual filter. `cls_attention` (default, the released code):
            `context.cls_attention`, which inside the model is the CLS row of the attention chosen by
            `cls_attention_layer`. `cls_similarity` (the paper's wording, "the similarity of the class token
            to each patch"): the cosine between `context.cls_embedding` (the projected CLS token) and each
            patch feature.
        iqr_multiplier: the outlier fence is `Q3 + iqr_multiplier * (Q3 - Q1)` of the scores, in [0, 10];
            1.5 is Tukey's rule.
        cluster_merge: how each cluster becomes one token. `"released"` (default, the released code; the paper
            only says each cluster is merged into one token): centre `x_c + sum_j a_j x_j` over its members,
            `a_j` the CLS attention of member j (`context.cls_attention`), not normalised, plus one summary
            token `sum_j a_j x_j` over every patch that is neither kept nor a centre, in the last of the K
            slots. `"mean"`: the plain mean of the centre and its members, no summary token.
        cls_attention_layer: which CLS attention the model passes (for `visual_score="cls_attention"` and the
            released merge weights). `"released"` (default, the released code): the encoder's LAST layer
            computed as one full-width head on the states entering it
            (`released_cls_attention(encoder.layers[-1], hidden_states[-2])`), whatever the feature layer.
            `"feature_layer"`: the feature layer's (`vision_feature_layer`) attention, per head and averaged
            over heads (`vision_attention.cls_attention`).
        merge_space: where, inside the model, the centre and summary tokens are summed. `"vision"` (default,
            the released code's `encode_images`: tower, merge, projector): the vision features that enter the
            projector are merged and the merged tokens are projected; kept patches are the projector's own
            rows. `"projected"`: the projected features are merged. With a non-linear projector (LLaVA-1.5's
            MLP) the two differ. A standalone call (`compressor(features, context)`) has no projector and
            merges the features it is given.
    """

    visual_score: str = "cls_attention"
    iqr_multiplier: float = 1.5
    cluster_merge: str = "released"
    cls_attention_layer: str = "released"
    merge_space: str = "vision"

    def __post_init__(self):
        check_choice("visual_score", self.visual_score, VISUAL_SCORES)
        check_range("iqr_multiplier", self.iqr_multiplier, 0.0, 10.0)
        check_choice("cluster_merge", self.cluster_merge, CLUSTER_MERGES)
        check_choice("cls_attention_layer", self.cls_attention_layer, CLS_ATTENTION_LAYERS)
        check_choice("merge_space", self.merge_space, MERGE_SPACES)


@dataclass
class MergePlan:
    """Recoverable's decisions for a batch, independent of the feature space the merge sums in.

    Args:
        slots: `(batch, K)` patch index of every output token, in rank order (kept, centres, summary slot).
        members: `(batch, N - K)` the other patches.
        assign: `(batch, N - K)` the slot (0..K-1) each member joins.
        weights: `(batch, N - K)` each member's weight in its slot (0: joins nothing).
        summary: `(batch, N)` float32 weights of the summary token (released merge), or None (mean merge).
        merged: `(batch, K)` bool, slots whose token is a merge (centres and summary), not a kept patch.
        scores: `(batch, N)` float32 visual scores.
    """

    slots: torch.Tensor
    members: torch.Tensor
    assign: torch.Tensor
    weights: torch.Tensor
    summary: torch.Tensor | None
    merged: torch.Tensor
    scores: torch.Tensor


def projector_input(feature_layer, hidden_states, num_patches: int) -> torch.Tensor:
    """`(images, N, width)` what a LLaVA projector receives, rebuilt from the vision tower's `hidden_states`
    as transformers' `LlavaModel.get_image_features` selects it: the `feature_layer` states (one index, or a list
    whose layers are concatenated), without the CLS token where the select strategy dropped it (the last
    `num_patches` positions: a CLS tower under `"default"`, a tower without CLS under `"full"`)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    chosen = [hidden_states[i] for i in layers]  # (images, 1 + N or N, width) each
    return torch.cat([states[:, states.shape[1] - num_patches :] for states in chosen], dim=-1)


def released_cls_attention(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`(batch, N)` float32 CLS attention as the released code computes it: one full-width head.

    The released code hooks `q_proj` and `k_proj` of the last CLIP layer (`encoder.layers[23]` of
    CLIP-L/336) and takes `softmax(q k^T / sqrt(width))` over all `1 + N` keys, without splitting heads.

    Args:
        layer: a `transformers` `CLIPEncoderLayer` (the released code: the encoder's last layer).
        hidden_states: `(batch, 1 + N, width)` the states ENTERING `layer` (for the last layer of a 24-layer
            encoder, `hidden_states[-2]`, LLaVA-1.5's feature layer); index 0 is CLS.
    """
    normed = layer.layer_norm1(hidden_states)  # (batch, 1 + N, width)
    query = layer.self_attn.q_proj(normed[:, :1]).float()  # (batch, 1, width)
    keys = layer.self_attn.k_proj(normed).float()  # (batch, 1 + N, width)
    logits = query @ keys.transpose(1, 2) * keys.shape[-1] ** -0.5  # (batch, 1, 1 + N)
    return logits.softmax(dim=-1)[:, 0, 1:]  # (batch, N)


def merge_clusters(
    features: torch.Tensor,
    slots: torch.Tensor,
    members: torch.Tensor,
    assign: torch.Tensor,
    weights: torch.Tensor,
    normalise: bool,
) -> torch.Tensor:
    """`(batch, K, D)` float32: every slot token plus the members assigned to it.

    `features` `(batch, N, D)`; `slots` `(batch, K)` and `members` `(batch, M)` patch indices; `assign`
    `(batch, M)` the slot (0..K-1) of each member; `weights` `(batch, M)` (0: the member joins nothing).
    Slot s becomes `x_s + sum_m w_m x_m`, divided by `1 + sum_m w_m` when `normalise` (with unit weights,
    the mean of the slot and its members). Slots that receive nothing stay bit-exact.
    Example: centre `[1, 0]`, members `[0.9, 0.1]` and `[0.8, 0.2]` with CLS attention 0.3 and 0.2:
    not normalised (released) `[1.43, 0.07]`; unit weights, normalised (mean) `[0.9, 0.1]`.
    """
    features = features.float()
    width = features.shape[-1]
    added = gather_tokens(features, members) * weights.unsqueeze(-1)  # (batch, M, D)
    sums = gather_tokens(features, slots).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, width), added)
    if not normalise:
        return sums  # (batch, K, D)
    mass = torch.ones(slots.shape, device=features.device).scatter_add(
        1, assign, weights.float()
    )  # (batch, K)
    return sums / mass.unsqueeze(-1)


def outlier_fence(scores: torch.Tensor, valid: torch.Tensor, multiplier: float) -> torch.Tensor:
    """`(batch,)` fence `Q3 + multiplier * (Q3 - Q1)` of each row's valid scores (NaN for an empty row).

    Quantiles use linear interpolation between order statistics (numpy's default).
    """
    masked = scores.float().masked_fill(~valid, float("nan"))  # (batch, N)
    q1, q3 = torch.nanquantile(
        masked, torch.tensor([0.25, 0.75], device=scores.device), dim=1
    )  # (batch,) each
    return q3 + multiplier * (q3 - q1)


def mean_text_embedding(
    text_embeds: torch.Tensor, text_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch, D)` mean of the valid text embeddings, and `(batch,)` bool: the row has any text."""
    if text_mask is None:
        text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
    weights = text_mask.float().unsqueeze(-1)  # (batch, T, 1)
    total = (text_embeds.float() * weights).sum(dim=1)  # (batch, D)
    count = weights.sum(dim=1)  # (batch, 1)
    return total / count.clamp(min=1), count.squeeze(-1) > 0


class DeftLlavaRecoverableCompressor(TokenCompressor):
    """Recoverable Compression: visual filter, text recovery, then cluster-merge the rest, K tokens exactly.

    Recoverable Compression (Chen et al., AAAI 2025, https://arxiv.org/abs/2409.01179), training-free:

    1. Visual filter: visual score `v_i` per patch (see `RecoverableSettings.visual_score`); the set V of
       patches with `v_i` above the outlier fence `Q3 + 1.5 * IQR` of all N scores.
    2. Text recovery: text score `t_i = cos(x_i, mean of the valid question text embeddings)`; the set T of
       patches outside V with `t_i` above the fence of the scores outside V. A row with no valid text
       recovers nothing.
    3. Secondary recovery: the remaining patches are clustered around centres and each cluster is merged to
       one token (`RecoverableSettings.cluster_merge`: by default the released rule, centre plus the
       CLS-attention-weighted sum of its members, and one summary token of all non-kept, non-centre patches).

    Exact K (so every method gets the same budget): patches are ranked V (by v, descending), then T (by t,
    descending), then the rest (by v, descending); ties go to the lower index. The first
    `k_keep = min(|V| + |T|, K - 1)` are kept unchanged (at least one slot always summarises the dropped
    patches). With `cluster_merge="released"` the next `K - k_keep - 1` are cluster centres and the last slot
    holds the summary token; with `"mean"` the next `K - k_keep` are centres. Every later patch joins the
    centre of largest cosine similarity on `context.vision_keys` (or on the features when no keys are given;
    ties go to the higher-ranked centre). Representative index: the patch itself, the cluster centre, or for
    the summary token the patch of its slot. `scores` is v.

    Differences from the paper / released code (banjiuyufen/Recoverable-Compression, `clip_encoder.py`,
    `token_recycling_with_text_in_vision_and_clustring`):
    - dynamic scale filter: the released code sets each count with the outlier ratio of sklearn's
      LocalOutlierFactor on the 1-D scores (and takes the number of centres as that ratio times the feature
      width, 1024, instead of the token count); here the parameter-free IQR fence, batched and deterministic,
      and the number of centres follows from K.
    - clusters: the released code lets each centre absorb its 32 nearest tokens (overlapping, other centres
      included, ranked by key cosine plus 50 x the text score); here the clusters partition the remaining
      patches by nearest centre. The model passes no `vision_keys`, so inside the model clusters are formed on
      the projected features (the released code: the last layer's keys).
    - merge order: none by default: as in the released `encode_images` (tower, merge, projector), the centre
      and summary tokens are sums of the projector's input, then projected (`merge_space="vision"`); kept
      patches are the projector's own rows. `merge_space="projected"` sums projected features instead.
    - none in the CLS attention by default (the last layer as one full-width head, as released); the
      feature layer's head-averaged attention is `cls_attention_layer="feature_layer"`, and the paper's
      wording (cosine of the projected CLS token and each patch) is `visual_score="cls_similarity"`.
    - text score: the released code compares the CLIP text encoder's projected embedding of the question with
      CLIP's projected patch features; here the question is the language model's input embeddings of the
      prompt text of the image's row, before or after it (`PromptBatch.questions`; mean of the valid tokens), compared with the projected patch features.
    - output order: the released code feeds the LLM [kept (ascending), centres (by CLS attention), summary];
      here every token sits at its representative patch (`kept_indices`), which gives its position id.
    """

    name = "recoverable"
    needs_cls_token = True  # both visual scores read the CLS token (its embedding or its attention)
    needs_text = True
    settings_class = RecoverableSettings
    decides_on_prompt = True  # the question is the prompt's text

    @classmethod
    def writes_all_placeholders(cls, config) -> bool:
        return True  # the model keeps K rows per image once the prompt is known, and re-packs

    def vision_layer_index(self, config) -> int:
        # the released CLS attention is the encoder's last layer's, whatever the feature layer
        return -1 if self.settings.cls_attention_layer == "released" else config.vision_feature_layer

    def compress_features(self, features, visual: VisualBatch):
        """The model's first hook: nothing is dropped yet (the question is not known); keep what the second
        needs: the projected CLS token of the feature layer, when asked its CLS attention `(images, N)`, and with
        `merge_space="vision"` the projector's input of every image `(N, width)`."""
        attention = None
        if self.needs_cls_attention and self.settings.cls_attention_layer == "released":
            attention = released_cls_attention(visual.vision_layer, visual.layer_input)  # (images, N)
        elif self.needs_cls_attention:
            attention = cls_attention(visual.vision_layer, visual.layer_input)  # (images, N)
        states = visual.encoder_outputs.hidden_states[visual.feature_layer]  # (images, 1 + N, width)
        cls_state = states[:, :1]  # (images, 1, width) the CLS token of the feature layer
        projector_inputs = None
        if self.settings.merge_space == "vision":  # the released order merges these, then projects
            hidden, n = visual.encoder_outputs.hidden_states, features.pooler_output[0].shape[0]
            projector_inputs = list(projector_input(visual.feature_layer, hidden, n))
        return updated(
            features,
            cls_embeddings=visual.projector(cls_state)[:, 0],  # (images, D)
            cls_attention=attention,
            projector_inputs=projector_inputs,  # per image (N, width)
        )

    def compress_with_prompt(self, features, prompt: PromptBatch):
        """The model's second hook: compress each image with its question.

        The question of an image is the text that follows it in its row, up to the prompt length: the model's
        own input embeddings of those tokens (padding and placeholders excluded). The method keeps K rows per
        image; a merged token is written into the row of its representative patch, the other rows are marked
        unused (`rows_used`), and the model re-packs the batch."""
        tokens = torch.stack(list(features.pooler_output))  # (images, N, D)
        images, n, _ = tokens.shape
        row, question = prompt.questions(
            int(prompt.placeholder_mask.sum()) // images
        )  # (images,), (images, seq): placeholders per image, whatever the method keeps
        side = math.isqrt(n)  # the grid only has to hold N patches: the method does not use its shape
        context = CompressionContext(
            spatial_shape=(side, side) if side * side == n else (1, n),
            num_kept=prompt.kept_per_item(self.name),
            cls_attention=features.cls_attention,
            cls_embedding=features.cls_embeddings,
            text_embeds=prompt.inputs_embeds[row].to(tokens.dtype),  # (images, seq, D)
            text_mask=question,  # (images, seq)
        )
        if self.settings.merge_space == "vision":  # the released order: merge the projector's input, project
            if features.projector_inputs is None or prompt.projector is None:
                raise ValueError(
                    "recoverable with merge_space='vision' needs features.projector_inputs (set by its "
                    "compress_features hook) and prompt.projector (the model's multi_modal_projector) to merge "
                    f"before projecting; got projector_inputs={'None' if features.projector_inputs is None else 'set'}, "
                    f"projector={'None' if prompt.projector is None else 'set'}; or use merge_space='projected'"
                )
            vision = torch.stack(list(features.projector_inputs))  # (images, N, width)
            out = self.compress_merging_vision(tokens, vision, prompt.projector, context)
        else:
            out = self(tokens, context)  # K tokens per image, with their representative patch
        index = out.kept_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (images, K, D)
        placed = tokens.scatter(1, index, out.tokens.to(tokens.dtype))  # (images, N, D)
        keep = torch.zeros(images, n, dtype=torch.bool, device=tokens.device).scatter_(
            1, out.kept_indices, True
        )
        return updated(
            features,
            pooler_output=list(placed),
            rows_used=list(keep),
            rows_selected=list(keep),
            compression_scores=out.scores,
        )

    def __init__(self, token_dim: int, settings: RecoverableSettings | None = None):
        super().__init__(token_dim, settings)
        # the visual score and the released merge weights decide which input the model must provide
        self.needs_cls_attention = (
            self.settings.visual_score == "cls_attention" or self.settings.cluster_merge == "released"
        )

    def check_inputs(self, image_features: torch.Tensor, context: CompressionContext) -> None:
        super().check_inputs(image_features, context)
        if self.settings.visual_score == "cls_similarity" and context.cls_embedding is None:
            raise ValueError(
                "recoverable with visual_score='cls_similarity' needs context.cls_embedding (batch_size, hidden_size); "
                "pass it, or use visual_score='cls_attention' with context.cls_attention"
            )

    def visual_scores(self, image_features: torch.Tensor, context: CompressionContext) -> torch.Tensor:
        """`(batch, N)` visual score of every patch."""
        if self.settings.visual_score == "cls_attention":
            return context.cls_attention.float()
        return F.cosine_similarity(image_features.float(), context.cls_embedding.float().unsqueeze(1), dim=-1)

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        plan = self.plan(image_features, context)
        tokens = self.merge(image_features, plan)
        return CompressionResult(
            tokens=tokens.to(image_features.dtype), kept_indices=plan.slots, scores=plan.scores
        )

    def compress_merging_vision(
        self,
        image_features: torch.Tensor,
        vision_features: torch.Tensor,
        projector: nn.Module,
        context: CompressionContext,
    ) -> CompressionResult:
        """The released order (`merge_space="vision"`): rank and cluster on the projected features, sum the
        centre and summary tokens from the vision features, then project them.

        Args:
            image_features: `(batch, N, D)` the projector's output; it ranks the patches (the question's
                embeddings live in this space) and gives the kept patches' tokens unchanged.
            vision_features: `(batch, N, width)` the projector's input for the same patches.
            projector: maps `(batch, K, width)` to `(batch, K, D)` (the model's `multi_modal_projector`).
            context: as for `forward`.

        Returns:
            `CompressionResult` with K tokens per row in ascending patch order, like `forward`.

        Raises:
            ValueError: inputs that do not fit together (`check_inputs`), or `vision_features` whose batch and
                patch counts differ from `image_features`'.
        """
        self.check_inputs(image_features, context)
        if vision_features.shape[:2] != image_features.shape[:2]:
            raise ValueError(
                f"vision_features {tuple(vision_features.shape)} must have the batch and patch counts of "
                f"image_features {tuple(image_features.shape)}"
            )
        if context.num_kept == image_features.shape[1]:
            return self(image_features, context)
        plan = self.plan(image_features, context)
        weight = next(projector.parameters())
        merged = projector(self.merge(vision_features, plan).to(weight.dtype))  # (batch, K, D)
        kept = gather_tokens(image_features, plan.slots)  # (batch, K, D) the projector's own rows
        tokens = torch.where(plan.merged.unsqueeze(-1), merged.to(kept.dtype), kept)
        return sort_by_index(CompressionResult(tokens=tokens, kept_indices=plan.slots, scores=plan.scores))

    def plan(self, image_features: torch.Tensor, context: CompressionContext) -> MergePlan:
        """Which patches are kept, which are centres, and who joins whom (see the class doc)."""
        batch, num_patches, _ = image_features.shape
        k = context.num_kept
        multiplier = self.settings.iqr_multiplier
        released = self.settings.cluster_merge == "released"
        everything = torch.ones(batch, num_patches, dtype=torch.bool, device=image_features.device)

        visual = self.visual_scores(image_features, context)  # (batch, N)
        in_v = visual > outlier_fence(visual, everything, multiplier).unsqueeze(1)  # (batch, N)
        text, has_text = mean_text_embedding(context.text_embeds, context.text_mask)  # (batch, D), (batch,)
        text_score = F.cosine_similarity(image_features.float(), text.unsqueeze(1), dim=-1)  # (batch, N)
        in_t = text_score > outlier_fence(text_score, ~in_v, multiplier).unsqueeze(1)
        in_t = in_t & ~in_v & has_text.unsqueeze(1)  # (batch, N)

        # rank: group (V=0, T=1, rest=2) ascending, then the group's score descending, then index
        group = torch.full_like(visual, 2, dtype=torch.long).masked_fill(in_t, 1).masked_fill(in_v, 0)
        within = torch.where(in_t, text_score, visual)  # (batch, N)
        order = within.sort(dim=1, descending=True, stable=True).indices  # (batch, N)
        order = order.gather(1, group.gather(1, order).sort(dim=1, stable=True).indices)  # (batch, N)

        k_keep = (in_v.sum(1) + in_t.sum(1)).clamp(max=k - 1)  # (batch,)
        slots, members = order[:, :k], order[:, k:]  # (batch, K), (batch, N - K)
        rank = torch.arange(k, device=slots.device).unsqueeze(0)  # (1, K)
        last_centre = k - int(released)  # released: the last slot is the summary token
        is_centre = (rank >= k_keep.unsqueeze(1)) & (rank < last_centre)  # (batch, K)

        metric = context.vision_keys if context.vision_keys is not None else image_features
        metric = F.normalize(metric.float(), dim=-1)
        similarity = gather_tokens(metric, members) @ gather_tokens(metric, slots).transpose(
            1, 2
        )  # (batch, N-K, K)
        similarity = similarity.masked_fill(~is_centre.unsqueeze(1), float("-inf"))
        assign = similarity.argmax(dim=2)  # (batch, N - K), slot of each member
        summary = None
        if released:
            attention = context.cls_attention.float()  # (batch, N)
            has_centre = is_centre.any(dim=1, keepdim=True)  # (batch, 1) False when K - k_keep == 1
            weights = attention.gather(1, members) * has_centre  # (batch, N - K)
            # summary token: every patch neither kept nor a centre, i.e. all but the first K - 1 slots
            leftover = torch.ones(batch, num_patches, device=attention.device).scatter(
                1, slots[:, : k - 1], 0.0
            )
            summary = attention * leftover  # (batch, N)
        else:
            weights = torch.ones(members.shape, device=members.device)  # (batch, N - K)
        return MergePlan(
            slots=slots,
            members=members,
            assign=assign,
            weights=weights,
            summary=summary,
            merged=rank >= k_keep.unsqueeze(1),
            scores=visual,
        )

    def merge(self, features: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        """`(batch, K, width)` float32: `plan` applied to `features` `(batch, N, width)` (any width)."""
        released = plan.summary is not None
        tokens = merge_clusters(
            features, plan.slots, plan.members, plan.assign, plan.weights, normalise=not released
        )
        if released:
            tokens[:, -1] = (plan.summary.unsqueeze(1) @ features.float())[:, 0]  # (batch, width)
        return tokens
