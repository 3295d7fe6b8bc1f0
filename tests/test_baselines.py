"""The visual-token compression baselines: generic tests over the registry, and slow references per method.

Each reference is written plainly from the paper with Python loops over rows and tokens, and compared with
the batched implementation on the same random inputs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_deft_llava.compressors.compression_registry import COMPRESSION_METHODS, build_compressor
from modeling_deft_llava.compressors.method_deco import DeftLlavaDecoCompressor
from modeling_deft_llava.compressors.method_visionzip import VisionZipSettings
from modeling_deft_llava.compressors.token_compressor import CompressionContext

DIM = 8
METHODS = sorted(COMPRESSION_METHODS)
TENSORS = ("cls_attention", "vision_keys", "cls_embedding", "text_embeds", "text_mask")


def make_inputs(batch=3, rows=6, cols=6, num_kept=9, dim=DIM, seed=0, key_dim=None, dtype=torch.float32):
    """Random features and a context with every optional input filled in (some text padded)."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    features = torch.randn(batch, n, dim, generator=g)
    text_len = 5
    text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    text_mask[::2, 3:] = False  # every other row has padded text
    context = CompressionContext(
        spatial_shape=(rows, cols),
        num_kept=num_kept,
        cls_attention=torch.randn(batch, n + 1, generator=g).softmax(-1)[:, 1:],
        vision_keys=None if key_dim is None else torch.randn(batch, n, key_dim, generator=g),
        cls_embedding=torch.randn(batch, dim, generator=g),
        text_embeds=torch.randn(batch, text_len, dim, generator=g),
        text_mask=text_mask,
        seed=seed,
    )
    return features.to(dtype), context


def row_context(context: CompressionContext, b: int) -> CompressionContext:
    """The context of batch row b alone."""
    pick = {k: (getattr(context, k)[b : b + 1] if getattr(context, k) is not None else None) for k in TENSORS}
    return CompressionContext(context.spatial_shape, context.num_kept, seed=context.seed, **pick)


# ----------------------------------------------------------------------------------------------- generic


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("num_kept", [1, 4, 9, 25])
def test_shapes_order_and_exact_k(name, num_kept):
    features, context = make_inputs(num_kept=num_kept)
    result = build_compressor(name, DIM)(features, context)
    assert result.tokens.shape == (3, num_kept, DIM)
    assert result.tokens.dtype == features.dtype
    assert result.kept_indices.shape == (3, num_kept)
    assert result.kept_indices.dtype == torch.long
    assert (result.kept_indices >= 0).all() and (result.kept_indices < 36).all()
    assert (result.kept_indices.diff(dim=1) > 0).all(), "kept_indices must be strictly ascending"
    if result.scores is not None:
        assert result.scores.shape == (3, 36)


@pytest.mark.parametrize("name", METHODS)
def test_batch_rows_equal_single_rows(name):
    features, context = make_inputs(batch=4, num_kept=9, key_dim=5)
    compressor = build_compressor(name, DIM)
    batched = compressor(features, context)
    for b in range(4):
        single = compressor(features[b : b + 1], row_context(context, b))
        assert torch.equal(batched.kept_indices[b : b + 1], single.kept_indices)
        torch.testing.assert_close(batched.tokens[b : b + 1], single.tokens)


@pytest.mark.parametrize("name", METHODS)
def test_keep_all_is_identity(name):
    features, context = make_inputs(num_kept=36)
    result = build_compressor(name, DIM)(features, context)
    assert result.tokens is features
    assert torch.equal(result.kept_indices, torch.arange(36).expand(3, -1))


@pytest.mark.parametrize("name", METHODS)
def test_finite_in_bf16(name):
    features, context = make_inputs(num_kept=16, dtype=torch.bfloat16)
    context.text_embeds = context.text_embeds.bfloat16()
    context.cls_embedding = context.cls_embedding.bfloat16()
    result = build_compressor(name, DIM)(features, context)
    assert result.tokens.dtype == torch.bfloat16
    assert torch.isfinite(result.tokens.float()).all()


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("num_kept", [0, 37, -1, 2.5])
def test_bad_num_kept_raises(name, num_kept):
    features, context = make_inputs(num_kept=num_kept)
    with pytest.raises(ValueError, match=r"num_kept must be an int in \[1, 36\]"):
        build_compressor(name, DIM)(features, context)


@pytest.mark.parametrize("name", METHODS)
def test_bad_grid_and_width_raise(name):
    features, context = make_inputs()
    context.spatial_shape = (5, 6)
    with pytest.raises(ValueError, match=r"spatial_shape \(5, 6\) holds 30 patches"):
        build_compressor(name, DIM)(features, context)
    features, context = make_inputs()
    with pytest.raises(ValueError, match="token_dim=16"):
        build_compressor(name, 16)(features, context)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_settings_key_raises(name):
    with pytest.raises(ValueError, match="unknown settings"):
        build_compressor(name, DIM, {"not_a_setting": 1})


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="valid methods: .*divprune"):
        build_compressor("fastv2", DIM)


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("visionzip", {"contextual_ratio": 1.0}, r"contextual_ratio must be in \[0.0, 1.0\), got 1.0"),
        ("visionzip", {"contextual_ratio": -0.1}, r"contextual_ratio must be in"),
        ("visionzip", {"contextual_ratio": "high"}, r"contextual_ratio must be a number"),
        ("recoverable", {"visual_score": "attention"}, r"visual_score must be one of \('cls_similarity'"),
        ("recoverable", {"iqr_multiplier": -1.0}, r"iqr_multiplier must be in \[0.0, 10.0\], got -1.0"),
        ("recoverable", {"iqr_multiplier": float("nan")}, r"iqr_multiplier must be in"),
        ("recoverable", {"cluster_merge": "sum"}, r"cluster_merge must be one of \('released', 'mean'\)"),
    ],
)
def test_bad_settings_values_raise(name, settings, message):
    with pytest.raises(ValueError, match=message):
        build_compressor(name, DIM, settings)


def test_settings_are_typed_and_frozen():
    compressor = build_compressor("visionzip", DIM, {"contextual_ratio": 0.25})
    assert compressor.settings == VisionZipSettings(contextual_ratio=0.25)
    with pytest.raises(AttributeError):
        compressor.settings.contextual_ratio = 0.5


def test_missing_inputs_raise():
    features, context = make_inputs()
    context.cls_attention = None
    with pytest.raises(ValueError, match="visionzip needs context.cls_attention"):
        build_compressor("visionzip", DIM)(features, context)
    features, context = make_inputs()
    context.text_embeds = None
    with pytest.raises(ValueError, match="recoverable needs context.text_embeds"):
        build_compressor("recoverable", DIM)(features, context)
    features, context = make_inputs()
    context.cls_embedding = None
    by_similarity = build_compressor("recoverable", DIM, {"visual_score": "cls_similarity"})
    with pytest.raises(ValueError, match="needs context.cls_embedding"):
        by_similarity(features, context)
    # the default (released) visual score reads attention instead, and says so through its flag
    by_attention = build_compressor("recoverable", DIM)
    assert by_attention.needs_cls_attention
    assert by_attention(features, context).tokens.shape == (3, 9, DIM)
    # the released cluster merge weighs members by CLS attention; the cosine score with the plain mean needs none
    similarity = {"visual_score": "cls_similarity"}
    assert build_compressor("recoverable", DIM, similarity).needs_cls_attention
    assert not build_compressor(
        "recoverable", DIM, {**similarity, "cluster_merge": "mean"}
    ).needs_cls_attention
    features, context = make_inputs()
    context.cls_attention = None
    with pytest.raises(ValueError, match="recoverable needs context.cls_attention"):
        build_compressor("recoverable", DIM)(features, context)
    assert build_compressor("recoverable", DIM, {**similarity, "cluster_merge": "mean"})(
        features, context
    ).tokens.shape == (
        3,
        9,
        DIM,
    )


def test_bad_context_shape_raises():
    features, context = make_inputs()
    context.cls_attention = context.cls_attention[:, :-1]
    with pytest.raises(ValueError, match=r"context.cls_attention must have shape \(3, 36\), got \(3, 35\)"):
        build_compressor("visionzip", DIM)(features, context)


@pytest.mark.parametrize(("num_kept", "nearest"), [(10, r"\[9, 16\]"), (20, r"\[16, 25\]"), (30, r"\[25\]")])
def test_deco_needs_square_k_and_names_nearest(num_kept, nearest):
    features, context = make_inputs(rows=5, cols=7, num_kept=num_kept)
    with pytest.raises(
        ValueError, match=rf"perfect square in \[1, 4, 9, 16, 25\], got {num_kept}; nearest valid: {nearest}"
    ):
        DeftLlavaDecoCompressor(DIM)(features, context)


def test_registry_names_and_flags():
    # the registry is the one list of names: these stay registered, a new method needs no edit here
    assert {
        "random",
        "uniform",
        "deco",
        "divprune",
        "visionzip",
        "recoverable",
        "cdpruner",
        "prunesid",
    } <= set(METHODS)
    for name, cls in COMPRESSION_METHODS.items():
        assert cls.name == name
    assert COMPRESSION_METHODS["visionzip"].needs_cls_attention
    assert COMPRESSION_METHODS["recoverable"].needs_text


# ------------------------------------------------------------------------------------- references


def ref_uniform(n, k):
    return [math.floor((i + Fraction(1, 2)) * n / k) for i in range(k)]


def ref_random(n, k, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:k])


def ref_deco(grid, m):
    """grid: (R, C, D) -> (m*m tokens, m*m centre indices), cell [floor(iR/m), ceil((i+1)R/m))."""
    rows, cols, _ = grid.shape
    tokens, centres = [], []
    for i in range(m):
        r0, r1 = math.floor(Fraction(i * rows, m)), math.ceil(Fraction((i + 1) * rows, m))
        for j in range(m):
            c0, c1 = math.floor(Fraction(j * cols, m)), math.ceil(Fraction((j + 1) * cols, m))
            cell = [grid[r, c] for r in range(r0, r1) for c in range(c0, c1)]
            tokens.append(sum(cell) / len(cell))
            centres.append(((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2)
    return torch.stack(tokens), centres


def cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def ref_divprune(x, k):
    """Greedy max-min diversity on d = 1 - cos; first pick: the token whose nearest other token is farthest."""
    n = x.shape[0]
    d = [[1 - cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][j] for j in chosen), -i)))
    return sorted(chosen)


def ref_visionzip(x, attention, keys, k, ratio):
    """Dominant = top-d attention; targets uniformly among the rest; contextual = target + mean(assigned)."""
    n = x.shape[0]
    c = min(int(k * ratio + 0.5), k - 1)
    d = k - c
    dominant = sorted(range(n), key=lambda i: -float(attention[i]))[:d]
    out = {i: x[i] for i in dominant}
    if c:
        rest = [i for i in range(n) if i not in dominant]
        step = max(1, len(rest) // c)
        targets = rest[::step][:c]
        assigned = {t: [] for t in targets}
        for i in rest:
            if i in targets:
                continue
            sims = [cos(keys[i], keys[t]) for t in targets]
            assigned[targets[sims.index(max(sims))]].append(x[i])
        for t in targets:
            out[t] = x[t] + (sum(assigned[t]) / len(assigned[t]) if assigned[t] else 0)
    kept = sorted(out)
    return torch.stack([out[i] for i in kept]), kept


def quantile(values, q):
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fence(values, multiplier):
    q1, q3 = quantile(values, 0.25), quantile(values, 0.75)
    return q3 + multiplier * (q3 - q1)


def ref_recoverable(x, visual, text, text_mask, keys, k, multiplier, attention=None, rule="mean"):
    """Visual filter, text recovery (IQR fences), then partition the rest around the centres.

    `rule="mean"`: K - kept centres, each the mean of itself and its members. `"released"`: K - kept - 1
    centres, each itself plus its members weighted by `attention`, and a summary token in the last slot:
    the attention-weighted sum of every patch neither kept nor a centre."""
    n = x.shape[0]
    v = [float(s) for s in visual]
    in_v = {i for i in range(n) if v[i] > fence(v, multiplier)}
    valid = [text[j] for j in range(text.shape[0]) if text_mask[j]]
    in_t = set()
    if valid:
        query = sum(valid) / len(valid)
        t = [float(F.cosine_similarity(x[i].float(), query.float(), dim=0)) for i in range(n)]
        outside = [i for i in range(n) if i not in in_v]
        limit = fence([t[i] for i in outside], multiplier)
        in_t = {i for i in outside if t[i] > limit}
    group = [0 if i in in_v else 1 if i in in_t else 2 for i in range(n)]
    ranked = sorted(range(n), key=lambda i: (group[i], -(t[i] if group[i] == 1 else v[i]), i))
    k_keep = min(len(in_v) + len(in_t), k - 1)
    released = rule == "released"
    kept, centres, members = ranked[:k_keep], ranked[k_keep : k - int(released)], ranked[k:]
    clusters = {c: [x[c]] for c in centres}
    for i in members if centres else []:
        sims = [cos(keys[i], keys[c]) for c in centres]
        weight = float(attention[i]) if released else 1.0
        clusters[centres[sims.index(max(sims))]].append(weight * x[i])
    out = {i: x[i] for i in kept}
    out.update({c: sum(m) if released else sum(m) / len(m) for c, m in clusters.items()})
    if released:
        rest = [i for i in range(n) if i not in kept and i not in centres]
        out[ranked[k - 1]] = sum(float(attention[i]) * x[i] for i in rest)
    order = sorted(out)
    return torch.stack([out[i] for i in order]), order


grids = st.tuples(st.integers(2, 7), st.integers(2, 7))
FAST = settings(max_examples=12, deadline=None)


@FAST
@given(grid=grids, data=st.data())
def test_uniform_matches_reference(grid, data):
    rows, cols = grid
    n = rows * cols
    k = data.draw(st.integers(1, n - 1))
    features, context = make_inputs(batch=2, rows=rows, cols=cols, num_kept=k)
    result = build_compressor("uniform", DIM)(features, context)
    expected = ref_uniform(n, k)
    assert result.kept_indices.tolist() == [expected, expected]
    assert torch.equal(result.tokens, features[:, expected])


@FAST
@given(grid=grids, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_random_matches_reference(grid, seed, data):
    rows, cols = grid
    n = rows * cols
    k = data.draw(st.integers(1, n - 1))
    features, context = make_inputs(batch=2, rows=rows, cols=cols, num_kept=k)
    context.seed = seed
    result = build_compressor("random", DIM)(features, context)
    expected = ref_random(n, k, seed)
    assert result.kept_indices.tolist() == [expected, expected]
    assert torch.equal(result.tokens, features[:, expected])


def test_random_depends_on_seed():
    features, context = make_inputs(num_kept=9)
    first = build_compressor("random", DIM)(features, context).kept_indices
    context.seed = 1
    assert not torch.equal(first, build_compressor("random", DIM)(features, context).kept_indices)


@FAST
@given(grid=grids, data=st.data())
def test_deco_matches_reference(grid, data):
    rows, cols = grid
    m = data.draw(st.integers(1, min(rows, cols)))
    if m * m == rows * cols:
        return  # keep-all, covered by the identity test
    features, context = make_inputs(
        batch=2, rows=rows, cols=cols, num_kept=m * m, seed=data.draw(st.integers(0, 99))
    )
    result = build_compressor("deco", DIM)(features, context)
    for b in range(2):
        tokens, centres = ref_deco(features[b].reshape(rows, cols, DIM), m)
        assert result.kept_indices[b].tolist() == centres
        torch.testing.assert_close(result.tokens[b], tokens)


def test_deco_matches_adaptive_avg_pool_on_llava_grid():
    """576 = (336 // 14) ** 2 patches pooled to 144 = 12 ** 2, the DeCo LLaVA setting."""
    features = torch.randn(2, 576, DIM)
    result = build_compressor("deco", DIM)(features, CompressionContext((24, 24), 144))
    pooled = torch.nn.AdaptiveAvgPool2d((12, 12))(features.transpose(1, 2).reshape(2, DIM, 24, 24))
    torch.testing.assert_close(result.tokens, pooled.flatten(2).transpose(1, 2))
    # cells are 2 x 2: the representative is the cell's top-left patch
    assert result.kept_indices[0, :3].tolist() == [0, 2, 4]
    assert result.kept_indices[0, 12].item() == 2 * 24


@FAST
@given(grid=grids, seed=st.integers(0, 999), data=st.data())
def test_divprune_matches_reference(grid, seed, data):
    rows, cols = grid
    n = rows * cols
    k = data.draw(st.integers(1, n - 1))
    features, context = make_inputs(batch=2, rows=rows, cols=cols, num_kept=k, seed=seed)
    result = build_compressor("divprune", DIM)(features, context)
    for b in range(2):
        expected = ref_divprune(features[b], k)
        assert result.kept_indices[b].tolist() == expected
        assert torch.equal(result.tokens[b], features[b, expected])


def test_divprune_keeps_distinct_tokens_among_duplicates():
    """With many exact duplicates the greedy step must still return K distinct patches."""
    base = torch.randn(1, 3, DIM)
    features = base.repeat(1, 12, 1)  # (1, 36, D): 3 distinct vectors, 12 copies each
    result = build_compressor("divprune", DIM)(features, CompressionContext((6, 6), 9))
    assert result.kept_indices.unique().numel() == 9
    # the first three picks cover the three distinct vectors
    assert {i % 3 for i in result.kept_indices[0].tolist()} == {0, 1, 2}


@FAST
@given(
    grid=grids,
    seed=st.integers(0, 999),
    ratio=st.sampled_from([0.0, 0.15625, 0.3, 0.9]),
    use_keys=st.booleans(),
    data=st.data(),
)
def test_visionzip_matches_reference(grid, seed, ratio, use_keys, data):
    rows, cols = grid
    n = rows * cols
    k = data.draw(st.integers(1, n - 1))
    features, context = make_inputs(
        batch=2, rows=rows, cols=cols, num_kept=k, seed=seed, key_dim=4 if use_keys else None
    )
    result = build_compressor("visionzip", DIM, {"contextual_ratio": ratio})(features, context)
    for b in range(2):
        keys = context.vision_keys[b] if use_keys else features[b]
        tokens, kept = ref_visionzip(features[b], context.cls_attention[b], keys, k, ratio)
        assert result.kept_indices[b].tolist() == kept
        torch.testing.assert_close(result.tokens[b], tokens)


def test_visionzip_dominant_tokens_are_the_most_attended():
    features, context = make_inputs(num_kept=16)
    result = build_compressor("visionzip", DIM, {"contextual_ratio": 0.25})(features, context)  # 12 + 4
    for b in range(3):
        top = set(context.cls_attention[b].topk(12).indices.tolist())
        assert top <= set(result.kept_indices[b].tolist())
        for i, idx in enumerate(result.kept_indices[b].tolist()):
            if idx in top:
                assert torch.equal(result.tokens[b, i], features[b, idx])


@FAST
@given(
    grid=grids,
    seed=st.integers(0, 999),
    multiplier=st.sampled_from([0.0, 0.5, 1.5]),
    use_keys=st.booleans(),
    rule=st.sampled_from(["released", "mean"]),
    data=st.data(),
)
def test_recoverable_matches_reference(grid, seed, multiplier, use_keys, rule, data):
    rows, cols = grid
    n = rows * cols
    k = data.draw(st.integers(1, n - 1))
    features, context = make_inputs(
        batch=2, rows=rows, cols=cols, num_kept=k, seed=seed, key_dim=4 if use_keys else None
    )
    compressor = build_compressor(
        "recoverable",
        DIM,
        {"iqr_multiplier": multiplier, "cluster_merge": rule, "visual_score": "cls_similarity"},
    )
    result = compressor(features, context)
    for b in range(2):
        visual = F.cosine_similarity(features[b], context.cls_embedding[b].unsqueeze(0), dim=-1)
        keys = context.vision_keys[b] if use_keys else features[b]
        tokens, kept = ref_recoverable(
            features[b],
            visual,
            context.text_embeds[b],
            context.text_mask[b],
            keys,
            k,
            multiplier,
            context.cls_attention[b],
            rule,
        )
        assert result.kept_indices[b].tolist() == kept
        torch.testing.assert_close(result.tokens[b], tokens)


def test_recoverable_default_ranks_by_cls_attention_as_released():
    # the released code's visual filter reads the CLS attention; the paper's cosine wording is a setting
    features, context = make_inputs(batch=2, rows=8, cols=8, num_kept=20, seed=3)
    result = build_compressor("recoverable", DIM)(features, context)
    for b in range(2):
        tokens, kept = ref_recoverable(
            features[b],
            context.cls_attention[b],
            context.text_embeds[b],
            context.text_mask[b],
            features[b],
            20,
            1.5,
            context.cls_attention[b],
            "released",
        )
        assert result.kept_indices[b].tolist() == kept
        torch.testing.assert_close(result.tokens[b], tokens)


def test_recoverable_keeps_outliers_and_text_matches_unchanged():
    """A patch equal to CLS and a patch equal to the question are kept as they are."""
    # width 64: random cosines concentrate near 0, so the two planted patches are clear outliers
    features, context = make_inputs(batch=1, num_kept=9, dim=64, seed=5)
    features[0, 7] = context.cls_embedding[0] * 3
    context.text_mask[:] = True
    features[0, 20] = context.text_embeds[0].mean(0) * 2
    result = build_compressor("recoverable", 64)(features, context)
    kept = result.kept_indices[0].tolist()
    assert 7 in kept and 20 in kept
    torch.testing.assert_close(result.tokens[0, kept.index(7)], features[0, 7])
    torch.testing.assert_close(result.tokens[0, kept.index(20)], features[0, 20])


def test_recoverable_output_groups_partition_the_patches():
    """With the mean merge every patch lands in exactly one output token (kept alone, or in one cluster)."""
    n = 36
    features, context = make_inputs(batch=2, num_kept=9, dim=n, seed=7)
    # near one-hot features: an output's nonzero coordinates name the patches it averages
    features = torch.eye(n).expand(2, -1, -1) + 1e-4 * features
    result = build_compressor("recoverable", n, {"cluster_merge": "mean"})(features, context)
    for b in range(2):
        groups = [set((result.tokens[b, i] > 1e-2).nonzero().flatten().tolist()) for i in range(9)]
        assert sorted(j for g in groups for j in g) == list(range(n))
        for i, g in enumerate(groups):
            assert result.kept_indices[b, i].item() in g
            torch.testing.assert_close(result.tokens[b, i], features[b, sorted(g)].mean(0))


def test_recoverable_released_merge_centres_and_summary():
    """Released merge, one-hot features: a centre holds itself (1) and its members (their CLS attention);
    the last slot is the summary of every patch neither kept nor a centre, weighted by CLS attention."""
    n = 36
    features, context = make_inputs(batch=2, num_kept=9, dim=n, seed=7)
    features = torch.eye(n).expand(2, -1, -1).clone()
    result = build_compressor("recoverable", n)(features, context)
    attention = context.cls_attention
    for b in range(2):
        rows = result.tokens[b]  # (9, n): row i's coordinate j = weight of patch j in output token i
        own = [rows[i, result.kept_indices[b, i]].item() for i in range(9)]
        summary = [i for i in range(9) if own[i] != 1.0]
        assert len(summary) == 1, "exactly one output is not anchored on its own patch with weight 1"
        s = summary[0]
        in_summary = rows[s] > 0
        torch.testing.assert_close(rows[s][in_summary], attention[b][in_summary])
        centres = [i for i in range(9) if i != s and (rows[i] > 0).sum() > 1]
        for i in centres:  # members are a subset of the summary, at their CLS attention
            members = (rows[i] > 0) & (torch.arange(n) != result.kept_indices[b, i])
            assert bool(in_summary[members].all())
            torch.testing.assert_close(rows[i][members], attention[b][members])
        # the summary covers every patch that is not an anchor of a kept or centre token
        anchors = {result.kept_indices[b, i].item() for i in range(9) if i != s}
        assert set(in_summary.nonzero().flatten().tolist()) == set(range(n)) - anchors


def test_recoverable_released_order_merges_before_the_projector():
    """`merge_space="vision"` (the released `encode_images`: tower, merge, projector): one-hot vision features
    make the merged vision token's coordinates the merge weights; the projected output is the projector of that
    sum, kept patches are the projector's own rows, and the ranking is the projected-space call's."""
    n, width = 36, 36
    torch.manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(width, DIM), torch.nn.GELU(), torch.nn.Linear(DIM, DIM))
    vision = torch.eye(n).expand(2, -1, -1).clone()  # (2, N, width) one-hot patches
    with torch.no_grad():
        features = projector(vision)  # (2, N, DIM) what the model's projector gives
    _, context = make_inputs(batch=2, rows=6, cols=6, num_kept=9, seed=7)
    compressor = build_compressor("recoverable", DIM)
    with torch.no_grad():
        projected = compressor(features, context)  # the merge summed after the projector
        released = compressor.compress_merging_vision(features, vision, projector, context)
    assert torch.equal(released.kept_indices, projected.kept_indices)  # the ranking does not move
    plan = compressor.plan(features, context)
    merges = 0
    for b in range(2):
        order = plan.slots[b].sort().indices  # rank order -> output order
        for rank in range(9):
            out = released.tokens[b, order.argsort()[rank]]
            if plan.merged[b, rank]:  # a sum of one-hot vision rows, then the projector
                weights = compressor.merge(vision, plan)[b, rank]  # (width,) = its merge weights
                torch.testing.assert_close(out, projector(weights))
                if (weights > 0).sum() > 1:  # a real merge: summing after the non-linear projector differs
                    merges += 1
                    assert not torch.allclose(out, projected.tokens[b, order.argsort()[rank]], atol=1e-4)
            else:  # a kept patch: the projector's own row, bit-exact
                assert torch.equal(out, features[b, plan.slots[b, rank]])
    assert merges >= 2
