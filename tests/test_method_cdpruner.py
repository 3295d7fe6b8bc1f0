"""CDPruner (arXiv 2506.10967): the conditional DPP against a plain loop, its settings, and its place in the model.

The generic tests (shapes, batch rows, bf16, keep-all, bad budgets) run it through `test_baselines.py` and
`test_model_methods.py` because it is registered; this file checks what is particular to it.
"""

from __future__ import annotations

import math

import pytest
import tiny
import torch
import torch.nn.functional as F
from test_model import batch_inputs

from modeling_deft_llava.compressors.compression_registry import build_compressor
from modeling_deft_llava.compressors.method_cdpruner import (
    SPANNED_TOLERANCE,
    CDPrunerSettings,
    conditional_kernel,
    dpp_greedy_map,
    instruction_relevance,
)
from modeling_deft_llava.compressors.token_compressor import CompressionContext

IMAGE = 4  # <image> id in the tiny vocabulary


def make_inputs(batch=3, n=36, dim=48, text_len=5, num_kept=9, seed=0):
    """Random features and question embeddings; every other row's question is padded after 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, n, dim, generator=g)
    text = torch.randn(batch, text_len, dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[::2, 3:] = False
    side = math.isqrt(n)
    grid = (side, side) if side * side == n else (1, n)
    return features, CompressionContext(grid, num_kept, text_embeds=text, text_mask=mask)


def kept(features, context, **settings):
    return build_compressor("cdpruner", features.shape[-1], settings)(features, context).kept_indices


# ----------------------------------------------------------------------------------------------- reference


def ref_relevance(x, text, mask, negate=False, theta=None):
    """Per-token relevance of one image, written token by token: mean cosine to the valid question tokens,
    min-max normalised with the official offset, optionally exp(alpha r)."""
    valid = [text[t] for t in range(len(text)) if mask[t]]
    raw = []
    for i in range(len(x)):
        cosines = [float(F.cosine_similarity(x[i].double(), e.double(), dim=0)) for e in valid]
        raw.append((-1 if negate else 1) * sum(cosines) / len(cosines) if cosines else 0.0)
    low, high = min(raw), max(raw)
    r = [1.0] * len(x) if not valid or high == low else [(v - low + 1e-6) / (high - low) for v in raw]
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        r = [math.exp(alpha * v) for v in r]
    return r


def ref_cdpruner(x, text, mask, k, negate=False, theta=None):
    """One image: kernel entry by entry, then K greedy steps, each adding the token of largest log-det gain
    `log det(L_{S+i}) - log det(L_S)` (ties: lowest index). When no token can raise the determinant by more
    than SPANNED_TOLERANCE x the largest diagonal (the kernel's rank is used up), the next pick is the open
    token of largest diagonal L_ii (the documented rule). Returns sorted kept indices and the relevance."""
    n = len(x)
    r = ref_relevance(x, text, mask, negate, theta)
    kernel = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            cosine = 1.0 if i == j else float(F.cosine_similarity(x[i].double(), x[j].double(), dim=0))
            kernel[i, j] = r[i] * cosine * r[j]
    floor = SPANNED_TOLERANCE * max(float(kernel[i, i]) for i in range(n))
    picked, det_s = [], 1.0  # det(L_S), S empty
    for _ in range(k):
        best, best_gain, best_det = None, -math.inf, 0.0
        for i in range(n):
            if i in picked or det_s == 0.0:
                continue
            det_si = float(torch.linalg.det(kernel[picked + [i]][:, picked + [i]]))
            if det_si <= floor * det_s:
                continue  # spanned: adding token i cannot raise the determinant
            gain = math.log(det_si) - math.log(det_s)
            if gain > best_gain:
                best, best_gain, best_det = i, gain, det_si
        if best is None:  # rank used up (det(L_S) is 0 from now on): by relevance
            best = max((i for i in range(n) if i not in picked), key=lambda i: (kernel[i, i], -i))
        picked.append(best)
        det_s = best_det
    return sorted(picked), r


@pytest.mark.slow
@pytest.mark.parametrize(
    ("seed", "dim", "num_kept", "settings"),
    [
        (0, 48, 9, {}),
        (1, 48, 25, {}),
        (2, 48, 4, {"negate_relevance": True}),
        (3, 48, 9, {"theta": 0.5}),
        (4, 48, 9, {"theta": 0.0}),
        (5, 6, 12, {}),  # width 6: the kernel's rank (6) is used up after 6 picks
    ],
)
def test_matches_plain_log_det_greedy(seed, dim, num_kept, settings):
    features, context = make_inputs(dim=dim, num_kept=num_kept, seed=seed)
    result = build_compressor("cdpruner", dim, settings)(features, context)
    for b in range(features.shape[0]):
        want, relevance = ref_cdpruner(
            features[b],
            context.text_embeds[b],
            context.text_mask[b],
            num_kept,
            settings.get("negate_relevance", False),
            settings.get("theta"),
        )
        assert result.kept_indices[b].tolist() == want
        torch.testing.assert_close(result.scores[b].double(), torch.tensor(relevance, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- fast


@pytest.mark.parametrize("num_kept", [1, 5, 9, 30])
def test_exact_k_ascending_and_tokens_unchanged(num_kept):
    features, context = make_inputs(num_kept=num_kept)
    result = build_compressor("cdpruner", 48)(features, context)
    assert result.tokens.shape == (3, num_kept, 48) and result.kept_indices.shape == (3, num_kept)
    assert (result.kept_indices.diff(dim=1) > 0).all()
    assert torch.equal(result.tokens, features.gather(1, result.kept_indices[..., None].expand(-1, -1, 48)))
    assert result.scores.shape == (3, 36)


def test_first_pick_is_the_most_relevant_token():
    # the empty set's gain is the diagonal r_i^2: the first pick is the token closest to the question
    features, context = make_inputs()
    relevance = instruction_relevance(features, context.text_embeds, context.text_mask, CDPrunerSettings())
    picks = dpp_greedy_map(conditional_kernel(features, relevance), 4)
    assert torch.equal(picks[:, 0], relevance.argmax(dim=1))


def test_hand_checked_relevance_against_diversity():
    """x0 = (1, 0), x1 = (1, 0.1) (a near copy), x2 = (0, 1); the question is (1, 0). Raw relevance 1, 0.995, 0
    -> r = 1 + 1e-6, 0.995, 1e-6. After x0 the gains are r1^2 (1 - cos^2) = 0.990 * 0.0099 = 0.0098 for x1 and
    r2^2 = 1e-12 for x2: the near copy wins. With theta = 0.5 (alpha = 0.5) r = exp(r / 2) = 1.649, 1.645, 1.0
    and the gains are 2.705 * 0.0099 = 0.027 for x1 and 1.0 for x2: the different token wins."""
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    context = CompressionContext((1, 3), 2, text_embeds=torch.tensor([[[1.0, 0.0]]]))
    result = build_compressor("cdpruner", 2)(features, context)
    assert result.kept_indices.tolist() == [[0, 1]]
    torch.testing.assert_close(result.scores, torch.tensor([[1 + 1e-6, 1 / math.sqrt(1.01) + 1e-6, 1e-6]]))
    assert kept(features, context, theta=0.5).tolist() == [[0, 2]]


def test_the_question_changes_the_choice():
    features, context = make_inputs(batch=1, num_kept=4)
    choices = []
    for token in (3, 20):  # the question is one visual token's own feature
        context.text_embeds, context.text_mask = features[:, token : token + 1], None
        choices.append(kept(features, context))
        assert token in choices[-1][0].tolist()
        negated = kept(features, context, negate_relevance=True)
        assert token not in negated[0].tolist()  # negated, it is the least relevant token
    assert not torch.equal(choices[0], choices[1])


def test_theta_zero_and_no_question_are_the_unconditioned_dpp():
    features, context = make_inputs()
    unconditioned = kept(features, context, theta=0.0)  # exp(0 * r) = 1 for every token
    context.text_embeds = torch.randn(context.text_embeds.shape)
    assert torch.equal(kept(features, context, theta=0.0), unconditioned)
    context.text_mask = torch.zeros_like(context.text_mask)  # no question at all: r = 1
    assert torch.equal(kept(features, context), unconditioned)


def test_rank_used_up_fills_by_the_diagonal_with_distinct_tokens():
    # two directions, each repeated at random scales (cosines ignore scale): after one token of each, every
    # open gain is rounding noise; theta=0 gives every token r = 1, so the gains are the similarity's alone
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 16, generator=g)
    features = base[torch.arange(20) % 2][None] * torch.rand(1, 20, 1, generator=g)  # (1, 20, 16)
    relevance = instruction_relevance(features, torch.randn(1, 3, 16), None, CDPrunerSettings(theta=0.0))
    kernel = conditional_kernel(features, relevance)  # (1, 20, 20)
    picks = dpp_greedy_map(kernel, 7)[0].tolist()
    assert len(set(picks)) == 7
    assert {p % 2 for p in picks[:2]} == {0, 1}  # one token of each direction first
    rest = kernel[0].diagonal().clone()
    rest[picks[:2]] = -1
    assert picks[2:] == rest.argsort(descending=True, stable=True)[:5].tolist()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"negate_relevance": "yes"}, r"negate_relevance must be True or False, got 'yes'"),
        ({"negate_relevance": 1}, r"negate_relevance must be True or False, got 1"),
        ({"theta": 1.0}, r"theta must be in \[0.0, 1.0\), got 1.0"),
        ({"theta": -0.1}, r"theta must be in \[0.0, 1.0\), got -0.1"),
        ({"theta": float("nan")}, r"theta must be in"),
        ({"theta": "high"}, r"theta must be a number"),
        ({"relevance": "cosine"}, r"unknown settings \['relevance'\]"),
    ],
)
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        build_compressor("cdpruner", 8, settings)


def test_bad_settings_fail_at_config_time():
    with pytest.raises(ValueError, match=r"theta must be in \[0.0, 1.0\)"):
        tiny.config(use_deft=True, compression_method="cdpruner", compression_settings={"theta": 2})


def test_missing_question_raises():
    features, context = make_inputs()
    context.text_embeds = None
    with pytest.raises(ValueError, match="cdpruner needs context.text_embeds"):
        build_compressor("cdpruner", 48)(features, context)


# ----------------------------------------------------------------------------------------------- in the model


def test_in_the_model_each_image_is_pruned_with_its_own_question():
    """N placeholders per image; the kept rows are the standalone compressor's choice on the plain projected
    features and the language model's input embeddings of its row's text, before and after the image (one sample
    at a time; `PromptBatch.questions`)."""
    settings = dict(use_deft=True, deft_retention_ratio=0.25, compression_method="cdpruner")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor, n_images=(2, 1), questions=("what is in the picture ?", "a cat ?"))
    assert ((inputs["input_ids"] == IMAGE).sum(1) == torch.tensor([32, 16])).all()
    with torch.no_grad():
        out = model(**inputs)
        with model.model.compression_disabled():
            features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        embeds = model.model.language_model.embed_tokens(inputs["input_ids"])  # (batch, seq, D)
    compressor = build_compressor("cdpruner", embeds.shape[-1])
    item = 0
    for b in range(2):
        ids, valid = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        images = int((ids == IMAGE).sum()) // 16  # 16 placeholders per image
        for _ in range(images):
            text = [u for u in range(len(ids)) if valid[u] and ids[u] != IMAGE]
            context = CompressionContext((4, 4), 4, text_embeds=embeds[b, text][None])
            want = compressor(features[item][None], context).kept_indices[0]
            assert torch.equal(out.kept_indices[item], want)
            item += 1
    assert item == 3
