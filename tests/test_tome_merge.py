"""`tome_bipartite_merge` against a slow loop written from the ToMe paper, plus its invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_deft_llava.compressors.tome_merge import tome_bipartite_merge


def ref_tome(x, size, r, metric, protect_first, order="positions"):
    """One row: A = even, B = odd positions; the r A tokens most similar to B merge into their best B.

    Output order: `"positions"` in place; `"released"` [unmerged A (ascending with protect_first, else by
    similarity), B]."""
    t = x.shape[0]
    r = min(r, (t - int(protect_first)) // 2)
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    best, partner = {}, {}
    for a in a_pos:
        sims = [float(F.cosine_similarity(metric[a].double(), metric[b].double(), dim=0)) for b in b_pos]
        best[a] = float("-inf") if (protect_first and a == 0) else max(sims)
        partner[a] = b_pos[sims.index(max(sims))]
    ranked = sorted(a_pos, key=lambda a: (-best[a], a))
    src = ranked[: max(r, 0)]
    acc = {p: x[p].double() * float(size[p]) for p in range(t)}
    sizes = {p: float(size[p]) for p in range(t)}
    sources = {p: {p} for p in range(t)}
    for s in src:
        d = partner[s]
        acc[d] = acc[d] + x[s].double() * float(size[s])
        sizes[d] += float(size[s])
        sources[d] |= sources[s]
    kept = [p for p in range(t) if p not in src]
    if order == "released" and r > 0:
        unmerged = ranked[r:]
        kept = (sorted(unmerged) if protect_first else unmerged) + b_pos
    tokens = torch.stack([(acc[p] / sizes[p]).float() for p in kept])
    return tokens, [sizes[p] for p in kept], [sorted(sources[p]) for p in kept], kept


@settings(max_examples=20, deadline=None)
@given(
    num_tokens=st.integers(2, 17),
    r=st.integers(-1, 10),
    protect_first=st.booleans(),
    use_metric=st.booleans(),
    order=st.sampled_from(["positions", "released"]),
    seed=st.integers(0, 999),
)
def test_matches_reference(num_tokens, r, protect_first, use_metric, order, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, num_tokens, 6, generator=g)
    size = torch.randint(1, 4, (2, num_tokens), generator=g).float()
    metric = torch.randn(2, num_tokens, 5, generator=g) if use_metric else None
    out = tome_bipartite_merge(x, size, r, metric=metric, protect_first=protect_first, order=order)
    for b in range(2):
        tokens, sizes, sources, kept = ref_tome(
            x[b], size[b], r, metric[b] if use_metric else x[b], protect_first, order
        )
        assert out.kept_positions[b].tolist() == kept
        torch.testing.assert_close(out.tokens[b], tokens)
        assert out.sizes[b].tolist() == sizes
        assert [row.nonzero().flatten().tolist() for row in out.source[b]] == sources


def test_invariants_and_chaining():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 8)  # CLS + 16 patches
    first = tome_bipartite_merge(x, None, 5, protect_first=True)
    second = tome_bipartite_merge(first.tokens, first.sizes, 4, source=first.source, protect_first=True)
    for step, out in ((1, first), (2, second)):
        removed = 5 if step == 1 else 9
        assert out.tokens.shape == (3, 17 - removed, 8)
        # the source map partitions the 17 original tokens, and sizes count them
        assert torch.equal(out.source.sum(1), torch.ones(3, 17, dtype=torch.long))
        torch.testing.assert_close(out.sizes, out.source.sum(-1).float())
        # size-weighted merging preserves the size-weighted sum
        torch.testing.assert_close(
            (out.tokens * out.sizes.unsqueeze(-1)).sum(1), x.sum(1), rtol=1e-5, atol=1e-5
        )
        # the CLS token is never merged away and stays first
        assert (out.kept_positions[:, 0] == 0).all() and out.source[:, 0, 0].all()
        assert (out.kept_positions.diff(dim=1) > 0).all()


def test_no_op_and_clamp():
    x = torch.randn(2, 5, 4)
    same = tome_bipartite_merge(x, None, 0)
    assert same.tokens is x and same.kept_positions.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert tome_bipartite_merge(x, None, 99).tokens.shape == (2, 3, 4)  # at most T // 2 = 2 removed
    assert tome_bipartite_merge(x, None, 99, protect_first=True).tokens.shape == (2, 3, 4)


def test_rows_independent_and_bf16():
    x = torch.randn(4, 12, 8)
    both = tome_bipartite_merge(x, None, 4)
    one = tome_bipartite_merge(x[2:3], None, 4)
    torch.testing.assert_close(both.tokens[2:3], one.tokens)
    assert torch.equal(both.kept_positions[2:3], one.kept_positions)
    half = tome_bipartite_merge(x.bfloat16(), None, 4)
    assert half.tokens.dtype == torch.bfloat16 and torch.isfinite(half.tokens.float()).all()


def test_merges_the_obvious_pair():
    """Two identical tokens at positions 2 (A) and 5 (B) are the pair merged first."""
    x = torch.randn(1, 8, 16)
    x[0, 2] = x[0, 5]
    out = tome_bipartite_merge(x, None, 1)
    assert 2 not in out.kept_positions[0].tolist()
    assert out.source[0, out.kept_positions[0].tolist().index(5)].nonzero().flatten().tolist() == [2, 5]


@pytest.mark.parametrize("r", [1, 3])
def test_duplicate_partners_share_a_destination(r):
    """Several A tokens may choose the same B token; its size grows by all of them."""
    x = torch.randn(1, 8, 4)
    x[0, 0] = x[0, 2] = x[0, 4] = x[0, 1]
    out = tome_bipartite_merge(x, None, r)
    dst = out.kept_positions[0].tolist().index(1)
    assert out.sizes[0, dst].item() == 1 + r


def test_released_order_keeps_cls_first_and_rejects_unknown_orders():
    x = torch.randn(2, 9, 4)
    out = tome_bipartite_merge(x, None, 3, protect_first=True, order="released")
    assert (out.kept_positions[:, 0] == 0).all()
    assert (out.kept_positions[:, -4:] == torch.tensor([1, 3, 5, 7])).all()  # every B token, last
    with pytest.raises(ValueError, match="order must be 'positions' or 'released', got 'raster'"):
        tome_bipartite_merge(x, None, 3, order="raster")
