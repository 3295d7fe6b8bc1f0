"""DeFTModule: the seed README examples, properties over shapes/ratios/dtypes/modalities, gradients, RTD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from modeling_deft_llava.configuration import DEFAULTS, num_kept_tokens

from modeling_deft_llava import DeFTModule
from modeling_deft_llava.deft.topk_selector import select_topk


def small(**kw):
    torch.manual_seed(0)
    return DeFTModule(token_dim=kw.pop("token_dim", 16), semantic_dim=kw.pop("semantic_dim", 12), **kw)


# ----------------------------------------------------------------------------- seed README examples
def test_seed_quick_start():
    deft = DeFTModule(token_dim=1024, semantic_dim=512, retention_ratio=0.482, enable_rtd=True)
    tokens = torch.randn(2, 256, 1024)
    output = deft(tokens=tokens, modality="image", spatial_shape=(16, 16), inference_mode="fast")
    retained_tokens = output["retained_tokens"]
    assert retained_tokens.shape == (2, 123, 1024)  # round(0.482 * 256) = 123
    assert output["reconstructed_tokens"] is None


def test_seed_training_with_feedback():
    deft = DeFTModule(token_dim=64, semantic_dim=32)
    tokens = torch.randn(2, 256, 64, requires_grad=True)
    task_loss = (tokens.tanh() * torch.linspace(0, 1, 64)).sum()
    output = deft(
        tokens=tokens, modality="image", spatial_shape=(16, 16), task_loss=task_loss, inference_mode="hybrid"
    )
    weights = output["scoring_info"]["mixture_weights"]
    assert set(weights) == {"semantic", "feedback", "group"}
    assert torch.isclose(sum(weights.values()), torch.tensor(1.0))
    assert output["scoring_info"]["s_fb"] is not None
    assert output["feedback_loss"] is not None


def test_seed_video_and_text():
    video = DeFTModule(token_dim=64, retention_ratio=0.482)(
        tokens=torch.randn(1, 2048, 64), modality="video", spatial_shape=(16, 16), inference_mode="fast"
    )
    assert video["retained_tokens"].shape == (1, num_kept_tokens(2048, 0.482), 64)
    text = DeFTModule(token_dim=768, retention_ratio=0.482, enable_rtd=False)(
        tokens=torch.randn(2, 512, 768), modality="text", inference_mode="fast"
    )
    assert text["retained_tokens"].shape == (2, 247, 768)


def test_seed_rtd_reconstruction_example():
    deft = DeFTModule(token_dim=1024, enable_rtd=True)
    tokens = torch.randn(2, 256, 1024)
    logits = torch.randn(2, 256, 1000)  # near-uniform predictions: every token is uncertain
    output = deft(
        tokens=tokens, modality="image", spatial_shape=(16, 16), logits=logits, inference_mode="hybrid"
    )
    assert output["reconstructed_tokens"] is not None
    assert output["reconstructed_tokens"].shape == (2, 256 - 123, 1024)


def test_defaults_come_from_the_settings_record():
    deft = DeFTModule(token_dim=8)
    assert deft.retention_ratio == DEFAULTS.deft_retention_ratio
    assert deft.semantic_abstraction.fc1.out_features == DEFAULTS.deft_semantic_dim
    assert deft.token_dictionary.encoder.out_features == 8 // DEFAULTS.deft_rtd_bottleneck_ratio


# ----------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    rows=st.integers(1, 5),
    cols=st.integers(1, 5),
    frames=st.integers(1, 3),
    ratio=st.floats(0.05, 1.0),
    modality=st.sampled_from(["image", "video", "text"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_properties(batch, rows, cols, frames, ratio, modality, dtype, seed):
    deft = small(retention_ratio=ratio).to(dtype)
    n = rows * cols * (frames if modality == "video" else 1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, 16, generator=gen).to(dtype)
    shape = None if modality == "text" else (rows, cols)
    out = deft(tokens=tokens, modality=modality, spatial_shape=shape)
    k = num_kept_tokens(n, ratio)
    assert out.retained_tokens.shape == (batch, k, 16)
    assert out.retained_tokens.dtype == dtype
    # order kept, indices in range, tokens are the input rows
    assert bool((out.kept_indices.diff(dim=1) > 0).all())
    expect = torch.gather(tokens, 1, out.kept_indices.unsqueeze(-1).expand(-1, -1, 16))
    assert torch.equal(out.retained_tokens, expect)
    # kept scores >= dropped scores
    dropped = torch.ones(batch, n, dtype=torch.bool).scatter(1, out.kept_indices, False)
    for b in range(batch):
        if dropped[b].any():
            assert out.scores[b, out.kept_indices[b]].min() >= out.scores[b, dropped[b]].max()
    # batch rows equal single-sample runs: the same scores up to round-off (a batched matmul may differ from a
    # single-row one in the last bits), and the same choice wherever the k-th and (k+1)-th scores are apart
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for b in range(batch):
        single = deft(tokens=tokens[b : b + 1], modality=modality, spatial_shape=shape)
        torch.testing.assert_close(single.scores[0].float(), out.scores[b].float(), rtol=0, atol=tol)
        ranked = out.scores[b].float().sort(descending=True).values
        if k == n or ranked[k - 1] - ranked[k] > 2 * tol:
            assert torch.equal(single.kept_indices[0], out.kept_indices[b])
    # determinism
    again = deft(tokens=tokens, modality=modality, spatial_shape=shape)
    assert torch.equal(again.kept_indices, out.kept_indices)
    assert torch.isfinite(out.scores).all()


def test_keep_all_returns_input_unchanged():
    tokens = torch.randn(2, 9, 16)
    out = small(retention_ratio=1.0)(tokens=tokens, modality="image", spatial_shape=(3, 3))
    assert out.retained_tokens is tokens
    assert torch.equal(out.kept_indices, torch.arange(9).expand(2, 9))


def test_padding_aware_text_selection():
    deft = small(retention_ratio=0.5)
    tokens = torch.randn(2, 8, 16)
    mask = torch.tensor([[1] * 8, [0, 0, 0, 0, 1, 1, 1, 1]])
    out = deft(tokens=tokens, modality="text", attention_mask=mask)
    assert out.kept_mask.sum(1).tolist() == [4, 2]
    kept_b1 = out.kept_indices[1][out.kept_mask[1]]
    assert bool((kept_b1 >= 4).all())  # padding never kept
    alone = deft(tokens=tokens[1:, 4:], modality="text")
    assert torch.equal(kept_b1 - 4, alone.kept_indices[0])
    assert torch.equal(out.retained_tokens[1][out.kept_mask[1]], alone.retained_tokens[0])
    assert bool((out.retained_tokens[1][~out.kept_mask[1]] == 0).all())


def test_select_topk_reference():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 20, generator=gen)
    kept, mask = select_topk(scores, 0.3)
    for b in range(4):
        order = sorted(range(20), key=lambda i: -scores[b, i].item())[:6]
        assert kept[b].tolist() == sorted(order)


# ----------------------------------------------------------------------------- gradients
def test_every_trainable_part_gets_gradient():
    deft = small(retention_ratio=0.5)
    tokens = torch.randn(2, 16, 16, requires_grad=True)
    task_loss = (tokens**2).sum()
    out = deft(
        tokens=tokens, modality="image", spatial_shape=(4, 4), task_loss=task_loss, inference_mode="hybrid"
    )
    downstream = (out.retained_tokens * torch.randn_like(out.retained_tokens)).sum()
    (downstream + out.feedback_loss + out.rtd_loss).backward()
    for name, param in deft.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_mixture_learns_from_the_feedback_loss_not_from_the_gate():
    deft = small(retention_ratio=0.5)
    out = deft(tokens=torch.randn(2, 16, 16), modality="image", spatial_shape=(4, 4))
    (out.retained_tokens * torch.randn_like(out.retained_tokens)).sum().backward()
    grad = deft.score_mixer.mixture_logits.grad
    assert grad is None or not grad.any()  # the straight-through gate does not train the mixture
    assert deft.saliency_scorer.mlp[0].weight.grad.abs().sum() > 0  # ... but it trains the scorer
    deft.zero_grad()
    tokens = torch.randn(2, 16, 16, requires_grad=True)
    out = deft(tokens=tokens, modality="image", spatial_shape=(4, 4), task_loss=(tokens**3).sum())
    out.feedback_loss.backward()
    assert (deft.score_mixer.mixture_logits.grad != 0).all()  # every component's weight learns


def test_feedback_score_formula():
    deft = small(retention_ratio=0.5, alpha_var=0.7)
    tokens = torch.randn(1, 4, 16, requires_grad=True)
    weights = torch.randn(1, 4, 16)
    loss = (tokens * weights).sum()  # d loss / d tokens = weights
    out = deft(tokens=tokens, modality="text", task_loss=loss)
    raw = weights.norm(dim=-1) * torch.exp(-0.7 * weights.var(dim=-1, unbiased=False))
    expect = (raw - raw.min()) / (raw.max() - raw.min())
    assert torch.allclose(out.scoring_info["s_fb"], expect, atol=1e-6)


def test_rtd_round_trip_error_decreases_with_training():
    deft = small(retention_ratio=0.25)
    tokens = torch.randn(4, 16, 16)
    opt = torch.optim.Adam(deft.token_dictionary.parameters(), lr=1e-2)
    first = deft(tokens=tokens, modality="image", spatial_shape=(4, 4)).rtd_loss.item()
    for _ in range(60):
        opt.zero_grad()
        deft(tokens=tokens, modality="image", spatial_shape=(4, 4)).rtd_loss.backward()
        opt.step()
    last = deft(tokens=tokens, modality="image", spatial_shape=(4, 4)).rtd_loss.item()
    assert last < 0.5 * first


# ----------------------------------------------------------------------------- RTD modes
def _confident_logits(batch, n, vocab=10):
    logits = torch.full((batch, n, vocab), -20.0)
    logits[..., 0] = 20.0
    return logits


def test_hybrid_reconstructs_only_uncertain_pruned_tokens():
    deft = small(retention_ratio=0.5)
    tokens = torch.randn(1, 16, 16)
    logits = _confident_logits(1, 16)
    logits[0, :4] = 0.0  # tokens 0-3 are uncertain
    out = deft(tokens=tokens, modality="image", spatial_shape=(4, 4), logits=logits, inference_mode="hybrid")
    pruned = set(range(16)) - set(out.kept_indices[0].tolist())
    expect = sorted(pruned & {0, 1, 2, 3})
    got = out.reconstructed_indices[0][out.reconstructed_mask[0]].tolist() if expect else []
    assert got == expect


def test_adaptive_is_per_sample_all_or_nothing():
    deft = small(retention_ratio=0.5)
    tokens = torch.randn(2, 16, 16)
    logits = torch.stack([torch.zeros(10), torch.tensor([30.0] + [0.0] * 9)])  # sample 0 uncertain
    out = deft(
        tokens=tokens, modality="image", spatial_shape=(4, 4), logits=logits, inference_mode="adaptive"
    )
    assert out.scoring_info["num_reconstructed"].tolist() == [8, 0]
    certain = deft(
        tokens=tokens,
        modality="image",
        spatial_shape=(4, 4),
        logits=logits[1:].expand(2, -1),
        inference_mode="adaptive",
    )
    assert certain.reconstructed_tokens is None


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens=torch.randn(16, 16)), "rank 2"),
        (dict(tokens=torch.randn(1, 16, 16), modality="audio"), "modality must be one of"),
        (dict(tokens=torch.randn(1, 16, 16), spatial_shape=(3, 5)), "holds 15 patches"),
        (dict(tokens=torch.randn(1, 16, 16), spatial_shape=None), "spatial_shape"),
        (
            dict(tokens=torch.randn(1, 20, 16), modality="video", spatial_shape=(2, 3)),
            "whole number of frames",
        ),
        (dict(tokens=torch.randn(1, 16, 16), inference_mode="slow"), "inference_mode must be one of"),
        (dict(tokens=torch.randn(1, 16, 16), retention_ratio=1.5), r"in \(0, 1\]"),
        (dict(tokens=torch.randn(1, 16, 16), retention_ratio=0.0), r"in \(0, 1\]"),
        (dict(tokens=torch.randn(1, 16, 16), logits=torch.randn(2, 10)), "do not fit"),
        (dict(tokens=torch.randn(1, 16, 16), logits=torch.randn(1, 15, 10)), "do not fit"),
        (dict(tokens=torch.randn(1, 16, 16), inference_mode="adaptive"), "pass logits"),
        (dict(tokens=torch.randn(1, 16, 8)), "token_dim=16"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    kwargs.setdefault("modality", "image")
    kwargs.setdefault("spatial_shape", (4, 4))
    with pytest.raises(ValueError, match=message):
        small()(**kwargs)


def test_non_finite_tokens_are_refused():
    tokens = torch.randn(1, 16, 16)
    tokens[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite token.*\[\[0, 3\]\]"):
        small()(tokens=tokens, modality="image", spatial_shape=(4, 4))


@pytest.mark.parametrize(
    "kwargs",
    [dict(retention_ratio=2.0), dict(semantic_dim=0), dict(rtd_bottleneck_ratio=0), dict(image_neighbors=6)],
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        DeFTModule(token_dim=16, **kwargs)


def test_hybrid_needs_rtd():
    with pytest.raises(ValueError, match="enable_rtd=True"):
        small(enable_rtd=False)(tokens=torch.randn(1, 16, 16), spatial_shape=(4, 4), inference_mode="hybrid")


@pytest.mark.parametrize(
    ("modality", "shape", "n"), [("image", (8, 8), 64), ("image", (3, 5), 15), ("video", (2, 3), 24)]
)
@pytest.mark.parametrize("neighbors", [8, 4])
@pytest.mark.parametrize("window", [0, 2])
def test_group_score_convolution_equals_the_neighbour_gather(modality, shape, n, neighbors, window):
    """Images and videos score their fixed neighbourhoods with one convolution (no (batch, N, M, D) tensor);
    the gather path (still used with a token mask) is the reference."""
    from modeling_deft_llava.deft.group_scorer import group_scores

    gen = torch.Generator().manual_seed(n + neighbors + window)
    semantic, saliency = torch.randn(3, n, 16, generator=gen), torch.rand(3, n, generator=gen)
    kw = dict(image_neighbors=neighbors, video_window=window, text_neighbors=5)
    fast = group_scores(semantic, saliency, modality, shape, None, **kw)
    gathered = group_scores(semantic, saliency, modality, shape, torch.ones(3, n, dtype=torch.bool), **kw)
    torch.testing.assert_close(fast, gathered, rtol=0, atol=1e-6)


def test_inference_in_fast_mode_does_not_run_the_rtd_encoder():
    """`rtd_loss` is a training loss: eval mode with gradients off skips it (and its encode of every pruned
    token); the selection is the same, and training mode (or gradients on) still computes it."""
    deft = small(retention_ratio=0.25, enable_rtd=True)
    tokens = torch.randn(2, 16, 16)
    calls = []
    deft.token_dictionary.encoder.register_forward_hook(lambda *args: calls.append(1))
    deft.eval()
    with torch.no_grad():
        fast = deft(tokens=tokens, modality="image", spatial_shape=(4, 4), inference_mode="fast")
    assert calls == [] and fast.rtd_loss is None and fast.reconstructed_tokens is None
    with_grad = deft(tokens=tokens, modality="image", spatial_shape=(4, 4), inference_mode="fast")
    assert calls == [1] and with_grad.rtd_loss is not None
    assert torch.equal(fast.kept_indices, with_grad.kept_indices)
    assert torch.equal(fast.retained_tokens, with_grad.retained_tokens.detach())
    deft.train()
    with torch.no_grad():
        training = deft(tokens=tokens, modality="image", spatial_shape=(4, 4), inference_mode="fast")
    assert calls == [1, 1] and torch.equal(training.rtd_loss, with_grad.rtd_loss.detach())
    deft.eval()
    with torch.no_grad():  # hybrid still encodes the tokens it reconstructs (and only those)
        hybrid = deft(tokens=tokens, modality="image", spatial_shape=(4, 4), inference_mode="hybrid")
    assert hybrid.rtd_loss is None and hybrid.reconstructed_tokens is not None and calls == [1, 1, 1]


def test_group_score_constants_are_built_once_per_grid_and_survive_inference_mode(monkeypatch):
    """The depthwise weight and the neighbour count are cached per (kernel, width, grid): one convolution per
    call (the count's convolution of ones ran on every call). Built first under `inference_mode`, they still
    serve a training step, and the scores equal the uncached computation."""
    import torch.nn.functional as F

    from modeling_deft_llava.deft import group_scorer

    group_scorer._convolution_constants.cache_clear()
    gen = torch.Generator().manual_seed(0)
    semantic = torch.randn(2, 35, 16, generator=gen, requires_grad=True)
    saliency = torch.rand(2, 35, generator=gen)
    kw = dict(image_neighbors=8, video_window=2, text_neighbors=5)
    calls = []
    conv2d = F.conv2d
    monkeypatch.setattr(group_scorer.F, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    with torch.inference_mode():
        first = group_scorer.group_scores(semantic.detach(), saliency, "image", (5, 7), None, **kw)
    assert len(calls) == 2  # the count (built once) and the neighbour sums
    second = group_scorer.group_scores(semantic, saliency, "image", (5, 7), None, **kw)
    assert len(calls) == 3  # the neighbour sums only
    second.sum().backward()  # the cached constants are not inference tensors
    assert semantic.grad is not None and torch.isfinite(semantic.grad).all()
    torch.testing.assert_close(first, second.detach(), rtol=0, atol=0)
    reference = group_scorer.group_scores(
        semantic.detach(), saliency, "image", (5, 7), torch.ones(2, 35, dtype=torch.bool), **kw
    )
    torch.testing.assert_close(second.detach(), reference, rtol=0, atol=1e-6)
