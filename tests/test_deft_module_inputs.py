"""DeFTModule's tensor arguments are checked against `tokens`, and training gradients stay finite (issue 13 B-D)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_deft_llava import DeFTModule

GRID = dict(modality="image", spatial_shape=(4, 4))


def small(**kw):
    torch.manual_seed(0)
    return DeFTModule(token_dim=16, semantic_dim=12, saliency_hidden_dim=8, **kw)


def tokens(batch=2, n=16, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, 16, generator=gen) * scale).to(dtype)


# ----------------------------------------------------------------------------- B: argument checks
NAN = float("nan")
BAD = [
    # before: broadcast silently over the batch
    (
        dict(token_gradients=torch.randn(1, 16, 16)),
        ValueError,
        r"shape of tokens \(2, 16, 16\).*got \(1, 16, 16\)",
    ),
    # before: a RuntimeError from the broadcast inside the score
    (
        dict(token_gradients=torch.randn(2, 9, 16)),
        ValueError,
        r"shape of tokens \(2, 16, 16\).*got \(2, 9, 16\)",
    ),
    # before: the norm ran over the 8 features given, silently
    (dict(token_gradients=torch.randn(2, 16, 8)), ValueError, r"got \(2, 16, 8\)"),
    (
        dict(token_gradients=torch.ones(2, 16, 16, dtype=torch.long)),
        TypeError,
        "token_gradients must be a floating",
    ),
    (dict(token_gradients=[[0.0]]), TypeError, "token_gradients must be a torch.Tensor, got list"),
    (dict(token_gradients=torch.full((2, 16, 16), NAN)), ValueError, "token_gradients contain 32 non-finite"),
    (dict(token_gradients=torch.randn(2, 16, 16, device="meta")), ValueError, "token_gradients is on meta"),
    # before: an IndexError inside token_dictionary.uncertainty
    (dict(logits=torch.randn(2, 0)), ValueError, r"logits of shape \(2, 0\) do not fit tokens \(2, 16, 16\)"),
    (dict(logits=torch.randn(2, 16, 0)), ValueError, r"logits of shape \(2, 16, 0\) do not fit"),
    # before: NaN entropy compared False, so every token looked certain and nothing was reconstructed
    (dict(logits=torch.full((2, 10), NAN)), ValueError, "contain NaN or \\+inf in 2 distribution"),
    (dict(logits=torch.tensor([[0.0, float("inf")]] * 2)), ValueError, "NaN or \\+inf"),
    (dict(logits=torch.full((2, 16, 3), float("-inf"))), ValueError, "all -inf in 32 distribution"),
    (dict(logits=torch.ones(2, 10, dtype=torch.long)), TypeError, "logits must be a floating"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD)
def test_bad_tensor_argument_is_named_with_its_shape(kwargs, error, message):
    with pytest.raises(error, match=message):
        small()(tokens=tokens(), inference_mode="hybrid", **GRID, **kwargs)


@pytest.mark.parametrize(
    "mask, error, message",
    [
        ([[1, 1, 1, 0]] * 2, TypeError, "attention_mask must be a torch.Tensor, got list"),
        # before: .bool() read 0.5, 2 and NaN as "keep"
        (
            torch.tensor([[1.0, 1.0, 0.5, 0.0]] * 2),
            ValueError,
            r"only 0 \(padding\) and 1 \(token\), got values \['0.5'\]",
        ),
        (torch.tensor([[1, 1, 2, 0]] * 2), ValueError, r"got values \['2'\]"),
        (torch.tensor([[1.0, NAN, 1.0, 1.0]] * 2), ValueError, r"got values \['nan'\]"),
    ],
)
def test_bad_attention_mask_is_refused(mask, error, message):
    with pytest.raises(error, match=message):
        small()(tokens=tokens(n=4), modality="text", attention_mask=mask)


def test_task_loss_checks():
    deft = small()
    x = tokens().requires_grad_(True)
    # before: the NaN reached the scores and was reported as "DeFT scores are not finite ... check token_gradients"
    with pytest.raises(ValueError, match="task_loss is nan"):
        deft(tokens=x, task_loss=(x**2).sum() * NAN, **GRID)
    # before: token_gradients silently won and task_loss was ignored
    with pytest.raises(ValueError, match="pass task_loss or token_gradients, not both"):
        deft(tokens=x, task_loss=(x**2).sum(), token_gradients=torch.randn(2, 16, 16), **GRID)
    # a finite loss whose gradient is not: d sqrt(|x|) / dx at x = 0
    y = tokens()
    y[1, 5, 3] = 0.0
    y.requires_grad_(True)
    with pytest.raises(
        ValueError, match=r"d task_loss / d tokens is not finite .* first at \(batch, token\) \[\[1, 5\]\]"
    ):
        deft(tokens=y, task_loss=y.abs().sqrt().sum(), **GRID)


def test_minus_inf_logits_are_impossible_words_not_nan():
    # p = (1/2, 1/2, 0): normalised entropy log 2 / log 3 = 0.63 > 0.6, uncertain. Before: 0 * log 0 = NaN entropy,
    # compared False, so the sample looked certain and adaptive reconstructed nothing
    logits = torch.tensor([[0.0, 0.0, float("-inf")]] * 2)
    out = small(retention_ratio=0.5)(tokens=tokens(), logits=logits, inference_mode="adaptive", **GRID)
    assert out.scoring_info["num_reconstructed"].tolist() == [8, 8]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_tokens_of_another_dtype_are_cast_for_scoring(dtype):
    # before: torch's "mat1 and mat2 must have the same dtype" from the first Linear
    x = tokens(dtype=dtype)
    deft = small(retention_ratio=0.5)
    logits = torch.zeros(2, 10)  # uniform: every pruned token is reconstructed
    out = deft(tokens=x, logits=logits, inference_mode="hybrid", **GRID)
    assert out.retained_tokens.dtype == dtype and out.reconstructed_tokens.dtype == dtype
    same = deft(tokens=x.float(), logits=logits, inference_mode="hybrid", **GRID)
    assert torch.equal(out.kept_indices, same.kept_indices)
    torch.testing.assert_close(
        out.reconstructed_tokens.float(), same.reconstructed_tokens, rtol=1e-2, atol=1e-2
    )


# ----------------------------------------------------------------------------- C: finite gradients
def assert_finite_gradients(deft):
    bad = [
        name for name, p in deft.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"non-finite gradients: {bad}"


def test_padding_keeps_every_gradient_finite():
    # before: the mixed score's -inf on the padded position went through the min-max normalisation of the
    # feedback loss; its gradient there, 0 * inf, made every SAM, saliency and mixture gradient NaN
    deft = small().train()
    out = deft(
        tokens=tokens(batch=1, n=4),
        modality="text",
        attention_mask=torch.tensor([[1, 1, 1, 0]]),
        token_gradients=tokens(batch=1, n=4, seed=1),
    )
    (out.feedback_loss + out.rtd_loss + out.retained_tokens.sum()).backward()
    assert_finite_gradients(deft)
    assert deft.saliency_scorer.mlp[0].weight.grad.abs().sum() > 0


def test_large_tokens_train_in_float16():
    # before: the RTD loss was the plain MSE, ~1e6 for tokens of magnitude 1e3, and its float16 weight
    # gradients overflowed to inf (bfloat16 and float32 were fine)
    deft = small().to(torch.float16).train()
    out = deft(
        tokens=tokens(dtype=torch.float16, scale=1e3),
        token_gradients=tokens(dtype=torch.float16, seed=1),
        **GRID,
    )
    assert out.rtd_loss < 10  # relative to the tokens' own power
    (out.rtd_loss + out.feedback_loss).backward()
    assert_finite_gradients(deft)
    assert deft.token_dictionary.decoder.weight.grad.abs().sum() > 0


def test_rtd_loss_is_the_plain_mse_for_unit_scale_tokens():
    deft = small()
    x = tokens(scale=0.5)
    codes = deft.token_dictionary.decode(deft.token_dictionary.encode(x))
    torch.testing.assert_close(deft.token_dictionary.reconstruction_loss(x), (codes - x).pow(2).mean())


# ----------------------------------------------------------------------------- D: property
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    n=st.integers(1, 12),
    modality=st.sampled_from(["text", "image"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
    ratio=st.floats(0.05, 1.0),
    feedback=st.sampled_from(["gradients", "task_loss"]),
    mode=st.sampled_from(["fast", "hybrid"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_training_gradients_are_finite(batch, n, modality, dtype, scale, ratio, feedback, mode, seed, data):
    deft = small(retention_ratio=ratio).to(dtype).train()
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, n, 16, generator=gen) * scale).to(dtype).requires_grad_(True)
    kwargs = dict(modality=modality, inference_mode=mode)
    if modality == "image":
        kwargs["spatial_shape"] = (1, n)
    else:  # random right/left padding, at least one token per row
        valid = [data.draw(st.integers(1, n)) for _ in range(batch)]
        left = data.draw(st.booleans())
        mask = torch.tensor([[1 if (i >= n - v if left else i < v) else 0 for i in range(n)] for v in valid])
        kwargs["attention_mask"] = mask
    if feedback == "gradients":
        kwargs["token_gradients"] = torch.randn(batch, n, 16, generator=gen).to(dtype)
    else:  # a task loss computed in float32, as the error messages advise
        kwargs["task_loss"] = (x.float() * torch.randn(batch, n, 16, generator=gen)).tanh().mean()
    if mode == "hybrid":
        kwargs["logits"] = torch.randn(batch, n, 7, generator=gen).to(dtype)
    out = deft(tokens=x, **kwargs)
    downstream = out.retained_tokens.float().tanh().sum()
    if out.reconstructed_tokens is not None:
        downstream = downstream + out.reconstructed_tokens.float().tanh().sum()
    losses = [loss for loss in (out.feedback_loss, out.rtd_loss) if loss is not None]
    assert all(torch.isfinite(loss) for loss in losses)
    (downstream + sum(losses)).backward()
    assert_finite_gradients(deft)
    assert deft.semantic_abstraction.fc1.weight.grad is not None
    assert torch.isfinite(x.grad).all()
