"""PruneSID (`method_prunesid.py`): a slow plain-loop reference from the paper's steps, and fast behaviour tests.

The reference takes the principal components from an SVD of the `(D, N)` matrix (the method uses the
eigenvectors of the token Gram matrix), runs greedy NMS group by group and token by token, and shares the
budget with the official code's while-loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from test_baselines import make_inputs, row_context
from test_model import GEN, batch_inputs
from test_model_methods import method_settings

from modeling_deft_llava.compressors.compression_registry import build_compressor
from modeling_deft_llava.compressors.method_prunesid import DeftLlavaPruneSIDCompressor, PruneSIDSettings
from modeling_deft_llava.compressors.token_compressor import CompressionContext

DIM = 8


# ------------------------------------------------------------------------------------- reference


def ref_groups(x: torch.Tensor, g: int) -> list[int]:
    """PSCA: the (D, N) matrix of sigmoid features centred per token; token t -> argmax_j |v_j[t]| over the top
    g principal components v_j, its right singular vectors by descending singular value."""
    n, d = x.shape
    s = torch.sigmoid(x.double())
    c = [[float(s[t, k]) - float(s[t].mean()) for k in range(d)] for t in range(n)]  # (N, D) lists
    matrix = torch.tensor([[c[t][k] for t in range(n)] for k in range(d)])  # (D, N)
    vh = torch.linalg.svd(matrix, full_matrices=False).Vh  # (min(D, N), N), descending singular values
    top = [vh[i] for i in range(g)]
    groups = []
    for t in range(n):
        loads = [abs(float(v[t])) for v in top]
        groups.append(max(range(g), key=lambda j: (loads[j], -j)))
    return groups


def ref_cos(a, b) -> float:
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    return sum(u * v for u, v in zip(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0


def ref_keep(x: torch.Tensor, attention: torch.Tensor, k: int, total: int | None = None, settings=None):
    """The kept patch indices, sorted, of one image `x` (N, D) with CLS attention (N,)."""
    settings = settings or PruneSIDSettings()
    n, d = x.shape
    g = min(max(1, k // settings.tokens_per_group), n, d)
    total = k if total is None else total
    groups = ref_groups(x, g)
    rows = [[float(v) for v in x[t].double()] for t in range(n)]
    sim = [[ref_cos(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    pairs = [sim[i][j] for i in range(n) for j in range(i + 1, n)]
    tau = settings.nms_threshold_per_token * k * (sum(pairs) / len(pairs))
    score = [float(a) for a in attention.double()]
    # greedy NMS in each group: take the best remaining token, drop the remaining ones too similar to it
    survivors = {j: [] for j in range(g)}
    for j in range(g):
        left = sorted((t for t in range(n) if groups[t] == j), key=lambda t: (-score[t], t))
        while left:
            best = left.pop(0)
            survivors[j].append(best)
            left = [t for t in left if not sim[best][t] > tau]
    members = [sum(1 for t in range(n) if groups[t] == j) for j in range(g)]
    kept_nms = [len(survivors[j]) for j in range(g)]
    # budget per group, as the official while-loops
    lower = [min(1, m) for m in members]
    cap = settings.group_cap * math.ceil(k / 64)
    upper = [min(cap, m, s) for m, s in zip(members, kept_nms)]
    while sum(upper) < total:
        upper = [min(u + 1, m) for u, m in zip(upper, members)]
    rest = total - sum(lower)
    cumulative, marks = 0.0, []
    for s in kept_nms:
        cumulative += s / sum(kept_nms)
        marks.append(round(cumulative * rest))  # Python rounds half to even, as torch.round
    split = [marks[0]] + [marks[j] - marks[j - 1] for j in range(1, g)]
    budget = [min(lo + sp, u) for lo, sp, u in zip(lower, split, upper)]
    for j in sorted(range(g), key=lambda j: (-kept_nms[j], j)):
        budget[j] += min(upper[j] - budget[j], total - sum(budget))
    kept = []
    for j in range(g):
        suppressed = sorted(
            (t for t in range(n) if groups[t] == j and t not in survivors[j]), key=lambda t: (-score[t], t)
        )
        kept += (survivors[j] + suppressed)[: budget[j]]
    return sorted(kept)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_kept", [4, 9, 16, 20])
@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_prunesid_matches_plain_reference(seed, num_kept, offset):
    # float64 so both sides see the same near-ties; 36 tokens, 8 channels, up to 5 groups; an offset makes the
    # tokens alike (rho > 0, a positive NMS threshold, as real features), without one rho is about 0
    features, context = make_inputs(batch=2, num_kept=num_kept, seed=seed, dtype=torch.float64)
    features = features + offset
    result = build_compressor("prunesid", DIM)(features, context)
    for b in range(2):
        expected = ref_keep(features[b], context.cls_attention[b], num_kept)
        assert result.kept_indices[b].tolist() == expected
        torch.testing.assert_close(result.tokens[b], features[b, expected])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_prunesid_dynamic_counts_match_plain_reference(seed):
    from modeling_deft_llava.compressors.method_prunesid import dynamic_counts, prunesid_keep

    settings = PruneSIDSettings(dynamic_budget=True, feature_space="projected", reference_information=0.9)
    features, context = make_inputs(batch=2, num_kept=9, seed=seed, dtype=torch.float64)
    features[1, :18] = features[1, :1]  # half of image 1 repeats one token: more redundant, fewer tokens
    total = dynamic_counts(features, 9, settings)
    keep = prunesid_keep(features, context.cls_attention, 9, settings, total)
    for b in range(2):
        x = features[b]
        pairs = [ref_cos(x[i].tolist(), x[j].tolist()) for i in range(36) for j in range(i + 1, 36)]
        count = min(max(math.floor(9 * (1 - sum(pairs) / len(pairs)) / 0.9 + 0.5), 2), 36)
        assert int(total[b]) == count
        expected = ref_keep(x, context.cls_attention[b], 9, total=count, settings=settings)
        assert keep[b].nonzero().flatten().tolist() == expected
    assert int(total[1]) < int(total[0])


# ------------------------------------------------------------------------------------------ fast


@pytest.mark.parametrize("num_kept", [1, 3, 8, 20, 35])
def test_exactly_k_in_patch_order(num_kept):
    features, context = make_inputs(batch=3, num_kept=num_kept, seed=1)
    result = build_compressor("prunesid", DIM)(features, context)
    assert result.kept_indices.shape == (3, num_kept)
    assert (result.kept_indices.diff(dim=1) > 0).all()
    assert torch.equal(
        result.tokens, features.gather(1, result.kept_indices.unsqueeze(-1).expand(-1, -1, DIM))
    )
    assert result.scores is context.cls_attention


def test_identical_tokens_are_suppressed():
    # 36 tokens: 6 orthogonal directions, each repeated 6 times with the most attended copy first; K = 6
    # keeps one of each whatever the groups: copies (cos 1) are suppressed, distinct ones (cos 0) are not
    base = 3.0 * torch.eye(DIM)[:6]
    features = base.repeat_interleave(6, dim=0).unsqueeze(0)  # (1, 36, D)
    attention = torch.linspace(1.0, 0.1, 36).unsqueeze(0)  # token 0 most attended
    context = CompressionContext((6, 6), 6, cls_attention=attention)
    settings = {"tokens_per_group": 1}  # 6 groups
    result = build_compressor("prunesid", DIM, settings)(features, context)
    kept = result.kept_indices[0].tolist()
    assert len({tuple(features[0, i].tolist()) for i in kept}) == 6, kept
    assert kept == [0, 6, 12, 18, 24, 30]  # the most attended copy of each


def test_the_most_attended_token_is_always_kept():
    for seed in range(5):
        features, context = make_inputs(batch=2, num_kept=4, seed=seed)
        result = build_compressor("prunesid", DIM)(features, context)
        for b in range(2):
            assert int(context.cls_attention[b].argmax()) in result.kept_indices[b].tolist()


def test_batch_rows_equal_single_rows_at_several_budgets():
    compressor = build_compressor("prunesid", DIM)
    for k in (2, 9, 17):
        features, context = make_inputs(batch=4, num_kept=k, seed=3)
        batched = compressor(features, context)
        for b in range(4):
            assert torch.equal(
                batched.kept_indices[b],
                compressor(features[b : b + 1], row_context(context, b)).kept_indices[0],
            )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tokens_per_group": 0}, r"tokens_per_group must be an int >= 1, got 0"),
        ({"tokens_per_group": True}, r"tokens_per_group must be an int >= 1, got True"),
        ({"group_cap": 2.5}, r"group_cap must be an int >= 1, got 2.5"),
        ({"nms_threshold_per_token": 0.0}, r"nms_threshold_per_token must be in \(0.0, inf\], got 0.0"),
        ({"nms_threshold_per_token": "x"}, r"nms_threshold_per_token must be a number"),
        ({"reference_information": 2.5}, r"reference_information must be in \(0.0, 2.0\], got 2.5"),
        ({"dynamic_budget": 1}, r"dynamic_budget must be True or False, got 1"),
        ({"feature_space": "clip"}, r"feature_space must be one of \('vision', 'projected'\), got 'clip'"),
        ({"dynamic_budget": True}, r"needs feature_space='projected', got feature_space='vision'"),
    ],
)
def test_bad_settings_raise(settings, message):
    with pytest.raises(ValueError, match=message):
        PruneSIDSettings(**settings)
    with pytest.raises(ValueError, match=message):
        tiny.config(use_deft=True, compression_method="prunesid", compression_settings=settings)


def test_placeholder_policy_follows_the_setting():
    fixed = tiny.config(use_deft=True, deft_retention_ratio=0.25, compression_method="prunesid")
    dynamic = tiny.config(
        use_deft=True,
        deft_retention_ratio=0.25,
        compression_method="prunesid",
        compression_settings={"dynamic_budget": True, "feature_space": "projected"},
    )
    assert fixed.num_kept_tokens(16) == 4 and dynamic.num_kept_tokens(16) == 16
    assert not DeftLlavaPruneSIDCompressor.writes_all_placeholders(fixed)
    assert DeftLlavaPruneSIDCompressor.writes_all_placeholders(dynamic)


def flat_and_noisy_images() -> list[Image.Image]:
    """A flat grey image (every patch alike: redundant) and a noisy one (patches differ)."""
    rng = np.random.default_rng(0)
    size = tiny.IMAGE_SIZE
    flat = np.full((size, size, 3), 128, dtype=np.uint8)
    noisy = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return [Image.fromarray(flat), Image.fromarray(noisy)]


def test_dynamic_budget_gives_content_dependent_counts_through_the_model():
    settings = dict(
        method_settings("prunesid"),
        deft_retention_ratio=0.5,
        compression_settings={
            "dynamic_budget": True,
            "feature_space": "projected",
            "reference_information": 0.5,
        },
    )
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    assert model.config.num_kept_tokens(tiny.NUM_PATCHES) == tiny.NUM_PATCHES  # N placeholders
    prompts = [tiny.prompt(1), tiny.prompt(1, "a ?")]
    inputs = processor(images=flat_and_noisy_images(), text=prompts, return_tensors="pt", padding=True)
    assert ((inputs["input_ids"] == 4).sum(1) == tiny.NUM_PATCHES).all()
    out = model(**inputs)
    counts = [len(kept) for kept in out.kept_indices]
    assert counts[0] < counts[1], counts  # the flat image keeps fewer tokens than the noisy one
    for kept in out.kept_indices:
        assert bool((kept.diff() > 0).all()) and 1 <= len(kept) <= tiny.NUM_PATCHES
    # the decision is the method's own: the same counts as calling it on the projected features
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    assert [int(r.sum()) for r in features.rows_used] == counts
    # cached generate equals generate without a cache, and batch rows equal single runs
    generated = model.generate(**inputs, **GEN)
    assert torch.equal(generated, model.generate(**inputs, **GEN, use_cache=False))
    for b in range(2):
        single = processor(images=flat_and_noisy_images()[b : b + 1], text=[prompts[b]], return_tensors="pt")
        assert torch.equal(model.generate(**single, **GEN)[0, -4:], generated[b, -4:])


def test_dynamic_keep_all_is_the_identity():
    settings = dict(
        method_settings("prunesid"),
        deft_retention_ratio=1.0,
        compression_settings={"dynamic_budget": True, "feature_space": "projected"},
    )
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    out = model(**inputs)
    assert all(len(kept) == tiny.NUM_PATCHES for kept in out.kept_indices)
