"""CDPruner: keep the visual tokens of maximal conditional diversity, a DPP conditioned on the instruction
(https://arxiv.org/abs/2506.10967)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling_outputs_deft_llava import updated
from .compression_method import PromptBatch, VisualBatch
from .token_compressor import (
    CompressionContext,
    CompressionResult,
    TokenCompressor,
    check_range,
    gather_tokens,
)

# the official min-max normalisation adds 1e-6 to the numerator, so the least relevant token keeps a tiny
# positive weight instead of vanishing from the kernel
RELEVANCE_OFFSET = 1e-6
# A residual gain at or below this fraction of the row's largest kernel diagonal counts as zero: the token
# lies in the span of the picked ones. In float32 the residuals of spanned tokens are rounding noise of about
# 1e-7 to 1e-6 of the largest diagonal after tens to hundreds of rank-one updates (measured: 576 random tokens
# of width 64, K = 84), and genuine gains of 576 tokens of width 4096 stay above 3e-5.
SPANNED_TOLERANCE = 1e-5


@dataclass(frozen=True)
class CDPrunerSettings:
    """Settings of CDPruner.

    Args:
        negate_relevance: score each token by MINUS its cosine to the instruction, as the official code does
            (`(-relevance).mean(dim=-1)`; its authors call the sign a phenomenon they observed only with CLIP
            as used in LLaVA, Theia-4869/CDPruner issue 14). Default False: the cosine itself, because here
            relevance is measured in the language model's embedding space, not CLIP's (see the class
            docstring).
        theta: None (default, the official code) uses the min-max normalised relevance r as the kernel's
            quality. A number in [0, 1) uses `exp(alpha * r)`, `alpha = theta / (2 * (1 - theta))`, the
            official code's commented-out knob that trades relevance against diversity: 0 ignores the
            instruction (a plain similarity DPP), values near 1 let relevance dominate.
    """

    negate_relevance: bool = False
    theta: float | None = None

    def __post_init__(self):
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"negate_relevance must be True or False, got {self.negate_relevance!r}")
        if self.theta is not None:
            check_range("theta", self.theta, 0.0, 1.0, high_open=True)


def instruction_relevance(
    image_features: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None,
    settings: CDPrunerSettings,
) -> torch.Tensor:
    """`(batch, N)` float32 relevance r of every token to its row's instruction, the kernel's quality term.

    `r_i = mean_t cos(x_i, e_t)` over the valid text embeddings `e_t` (negated with `negate_relevance`), then
    min-max normalised per row, `(r - min + 1e-6) / (max - min)`, then `exp(alpha * r)` when `theta` is set.
    A row with no valid text, or whose raw relevance is constant, gets r = 1: an unconditioned DPP.

    Args:
        image_features: `(batch, N, D)`.
        text_embeds: `(batch, T, D)` in the same space; text_mask: `(batch, T)` bool, or None (all valid).
    """
    if text_mask is None:
        text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
    unit_image = F.normalize(image_features.float(), dim=-1)  # (batch, N, D)
    unit_text = F.normalize(text_embeds.float(), dim=-1)  # (batch, T, D)
    cosine = unit_image @ unit_text.transpose(1, 2)  # (batch, N, T)
    weights = text_mask.float().unsqueeze(1)  # (batch, 1, T)
    count = weights.sum(dim=2)  # (batch, 1)
    raw = (cosine * weights).sum(dim=2) / count.clamp(min=1)  # (batch, N)
    if settings.negate_relevance:
        raw = -raw
    low, high = raw.amin(dim=1, keepdim=True), raw.amax(dim=1, keepdim=True)  # (batch, 1) each
    spread = high - low
    conditioned = (count > 0) & (spread > 0)  # (batch, 1)
    relevance = torch.where(
        conditioned, (raw - low + RELEVANCE_OFFSET) / torch.where(conditioned, spread, 1.0), 1.0
    )  # (batch, N)
    if settings.theta is not None:
        alpha = settings.theta / (2 * (1 - settings.theta))
        relevance = torch.exp(alpha * relevance)
    return relevance


def conditional_kernel(image_features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """`(batch, N, N)` float32 DPP kernel `L = diag(r) S diag(r)`, `S_ij = cos(x_i, x_j)`, `S_ii = 1` exactly
    (rounding would otherwise break the ties between tokens of equal relevance at random)."""
    unit = F.normalize(image_features.float(), dim=-1)  # (batch, N, D)
    similarity = unit @ unit.transpose(1, 2)  # (batch, N, N)
    similarity.diagonal(dim1=1, dim2=2).fill_(1.0)
    return relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)


def dpp_greedy_map(kernel: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP: `num_kept` picks per row, each maximising `log det(L_S)`.

    The fast incremental-Cholesky form (Chen et al., NeurIPS 2018, https://arxiv.org/abs/1709.05135): the gain
    of adding token i to the picked set S is `d_i^2 = det(L_{S+i}) / det(L_S)`, kept for every token and
    updated after each pick j with `e_i = (L_ji - <c_j, c_i>) / d_j`, `c_i <- [c_i, e_i]`, `d_i^2 -= e_i^2`.
    Ties go to the lowest index. Once every open token's gain is at most `SPANNED_TOLERANCE` times the row's
    largest diagonal (the kernel's rank is used up: the determinant cannot grow), the remaining picks take
    the open tokens by descending diagonal `L_ii = r_i^2 S_ii` (their relevance), without further updates.

    Args:
        kernel: `(batch, N, N)` symmetric positive semi-definite.
        num_kept: K, at most N.

    Returns:
        `(batch, num_kept)` long, in pick order (not sorted).
    """
    batch, num_tokens, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    diagonal = kernel.diagonal(dim1=1, dim2=2)  # (batch, N)
    tolerance = SPANNED_TOLERANCE * diagonal.amax(dim=1, keepdim=True)  # (batch, 1)
    gains = diagonal.clone()  # (batch, N) d_i^2 for the empty set
    factors = kernel.new_zeros(batch, num_kept, num_tokens)  # (batch, K, N) row t: e of pick t, the c_i
    chosen = torch.zeros(batch, num_tokens, dtype=torch.bool, device=kernel.device)
    picked = torch.empty(batch, num_kept, dtype=torch.long, device=kernel.device)
    for step in range(num_kept):
        open_gains = gains.masked_fill(chosen, float("-inf"))  # (batch, N)
        spanned = open_gains.amax(dim=1, keepdim=True) <= tolerance  # (batch, 1)
        score = torch.where(spanned, diagonal.masked_fill(chosen, float("-inf")), open_gains)
        best = score.argmax(dim=1)  # (batch,) first maximum: ties go to the lowest index
        picked[:, step] = best
        chosen[rows, best] = True
        # <c_j, c_i> for every i: (batch, 1, K) @ (batch, K, N); rows of later picks are still zero
        inner = (factors[rows, :, best].unsqueeze(1) @ factors).squeeze(1)  # (batch, N)
        norm = torch.where(spanned[:, 0], 1.0, gains[rows, best].clamp(min=0).sqrt())  # (batch,) d_j
        update = (kernel[rows, best] - inner) / norm.unsqueeze(1)  # (batch, N)
        update = update.masked_fill(spanned, 0.0)  # spanned rows: nothing left to project out
        factors[:, step] = update
        gains = gains - update.square()
    return picked


class DeftLlavaCDPrunerCompressor(TokenCompressor):
    """CDPruner: keep the K visual tokens of maximal conditional diversity (a DPP conditioned on the question).

    CDPruner (Zhang et al., NeurIPS 2025, https://arxiv.org/abs/2506.10967), training-free. For the projected
    visual tokens `x_1..x_N` of one image and its instruction:

    1. similarity `S_ij = cos(x_i, x_j)`;
    2. relevance `r_i`: the mean cosine of `x_i` to the instruction's embeddings, min-max normalised per
       image (`instruction_relevance`; `CDPrunerSettings.theta` optionally sharpens it);
    3. conditional kernel `L = diag(r) S diag(r)`: `det(L_S) = prod_{i in S} r_i^2 det(S_S)`, so a subset
       scores high when its tokens are both relevant and mutually different;
    4. greedy MAP inference of the DPP (`dpp_greedy_map`): K picks, each maximising `log det(L_S)`.

    Kept tokens are returned unchanged, in patch order; `scores` is r, the quality term of the kernel (the
    selection is a set, not a ranking by r). Budget: the project's rule `num_kept_tokens`.

    Where it runs: the instruction is known only once the prompt is, so the method acts in
    `compress_with_prompt` (as `recoverable`): the processor writes all N placeholders, the method marks
    the K kept rows (`rows_used`) and the model drops the others and re-packs the batch. The instruction of an
    image is every real text token of its row in the prompt, before or after it (`PromptBatch.questions`), as the language
    model's input embeddings of those tokens.

    Shapes: `compress` takes `(batch, N, D)` features with `context.text_embeds` `(batch, T, D)` and
    `context.text_mask` `(batch, T)` and returns `(batch, K, D)` tokens, `(batch, K)` ascending kept indices
    and `(batch, N)` scores.

    Raises:
        ValueError: (from `TokenCompressor.check_inputs`) no `context.text_embeds`, shapes that do not fit,
            K outside [1, N]; (settings) `negate_relevance` not a bool, `theta` outside [0, 1).

    Follows the official code, Theia-4869/CDPruner `llava/model/llava_arch.py` (`encode_images`, commit
    9541616c40fcd5625de1cdb8ea6c33c129eb7864). Differences from the official code:
    - instruction embeddings: the official code embeds the question with CLIP's text tower
      (`text_embeds`, one per 77-token segment) and compares it with CLIP's projected patch embeddings
      (`visual_projection(post_layernorm(...))`). This model has no CLIP text tower, so relevance compares the
      projected visual tokens (the space the similarity uses too) with the language model's input
      embeddings of the question tokens, one embedding per token, and averages over the tokens (the
      official code averages over its text segments).
    - the question: the official code passes the raw question string; here it is every real text token
      of the image's row in the prompt, before or after the image (a template may put the question on either
      side), so the chat template's words (`USER:`, `ASSISTANT:`) are included, and with several images in a
      row each reads the whole row's text. Answer tokens of a training batch (`labels`) are never read.
    - sign: the official code negates the cosine (a CLIP-specific observation of its authors); default here
      is the cosine itself, `negate_relevance=True` gives the official sign.
    - normalisation: the official code min-max normalises over the whole batch tensor (it runs batch 1);
      here per image, so batch rows equal single runs. A row with no question or constant relevance gets
      r = 1 (the official formula would divide by zero).
    - `S_ii` is set to exactly 1 (the official code keeps the rounded `cos(x_i, x_i)`): with equal relevance
      (`theta=0`, or no question) the first pick is then the lowest index, not a rounding accident.
    - rank exhaustion: when K exceeds the kernel's rank the official loop keeps picking by rounding noise
      (and can take the square root of a negative residual); here the remaining picks go by relevance
      (`dpp_greedy_map`). Below that point the picks are the official ones.
    - budget: K = `num_kept_tokens(N, deft_retention_ratio)` per image (the official code takes a fixed
      `visual_token_num`); kept tokens keep their patch order and original position ids, as the official
      code (a boolean mask over the patches).
    - LLaVA-NeXT: the official code also prunes each anyres crop with the same K; this model takes
      single-crop images (4-D `pixel_values`), each pruned as one set of N tokens.
    """

    name = "cdpruner"
    settings_class = CDPrunerSettings
    needs_text = True
    decides_on_prompt = True  # the instruction is the prompt's text
    token_layouts = ("grid", "sequence")  # never reads 2-D neighbours

    @classmethod
    def writes_all_placeholders(cls, config) -> bool:
        return True  # the K kept rows are chosen once the prompt is known; the model drops the others

    def compress_features(self, features, visual: VisualBatch):
        """Nothing yet: the instruction is not known before `compress_with_prompt`."""
        return features

    def compress_with_prompt(self, features, prompt: PromptBatch):
        """Keep K rows of each image, chosen with its question; mark the others unused (the model re-packs)."""
        tokens = torch.stack(list(features.pooler_output))  # (images, N, D)
        images, n, _ = tokens.shape
        row, question = prompt.questions(
            int(prompt.placeholder_mask.sum()) // images
        )  # (images,), (images, seq): placeholders per image, whatever the method keeps
        context = CompressionContext(
            spatial_shape=(1, n),  # the method does not read the grid
            num_kept=prompt.kept_per_item(self.name),
            text_embeds=prompt.inputs_embeds[row].to(tokens.dtype),  # (images, seq, D)
            text_mask=question,
        )
        out = self(tokens, context)
        keep = torch.zeros(images, n, dtype=torch.bool, device=tokens.device).scatter_(
            1, out.kept_indices, True
        )  # (images, N)
        return updated(
            features, rows_used=list(keep), rows_selected=list(keep), compression_scores=out.scores
        )

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        relevance = instruction_relevance(
            image_features, context.text_embeds, context.text_mask, self.settings
        )  # (batch, N)
        kernel = conditional_kernel(image_features, relevance)  # (batch, N, N)
        kept = dpp_greedy_map(kernel, context.num_kept)  # (batch, K), pick order
        return CompressionResult(
            tokens=gather_tokens(image_features, kept), kept_indices=kept, scores=relevance
        )
