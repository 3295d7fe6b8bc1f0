"""FGCS component 2: feedback-aware importance `s_fb` from the gradient of the task loss."""

from __future__ import annotations

import torch


def feedback_scores_from_gradients(token_gradients: torch.Tensor, alpha_var: float) -> torch.Tensor:
    """`s_fb_i = ||g_i||_2 * exp(-alpha_var * Var(g_i))` for gradients `g` of shape `(batch, tokens, dim)`.

    `Var` is the (biased) variance over the feature dimension of one token's gradient. Returns a detached
    `(batch_size, num_tokens)` float32 tensor: the feedback is a target, not something to differentiate.
    """
    if token_gradients.dim() != 3:
        raise ValueError(
            f"token_gradients must have shape (batch_size, num_tokens, dim), got {tuple(token_gradients.shape)}"
        )
    grads = token_gradients.detach().float()
    norm = grads.norm(dim=-1)  # (batch, tokens)
    var = grads.var(dim=-1, unbiased=False)  # (batch, tokens)
    return norm * torch.exp(-alpha_var * var)


def feedback_scores(task_loss: torch.Tensor, tokens: torch.Tensor, alpha_var: float) -> torch.Tensor:
    """Feedback score against `tokens`: the gradient is `d task_loss / d tokens`, where `tokens` is the exact
    tensor handed to DeFT (for DeFT-LLaVA: the projected image features, before selection).

    The graph is kept (`retain_graph=True`) so the caller can still call `task_loss.backward()`.
    """
    if not isinstance(task_loss, torch.Tensor) or task_loss.numel() != 1:
        raise ValueError(
            f"task_loss must be a scalar tensor, got {type(task_loss).__name__} {getattr(task_loss, 'shape', '')}"
        )
    if not task_loss.requires_grad or not tokens.requires_grad:
        raise ValueError(
            "task_loss was given but `tokens` is not part of its autograd graph: compute the loss from these "
            "tokens (with tokens.requires_grad=True), or pass token_gradients instead"
        )
    (grads,) = torch.autograd.grad(task_loss, tokens, retain_graph=True, allow_unused=True)
    if grads is None:
        raise ValueError(
            "task_loss does not depend on `tokens`: the feedback score needs d task_loss / d tokens"
        )
    nonfinite = ~torch.isfinite(grads).all(-1)  # (batch, N)
    if bool(nonfinite.any()):
        raise ValueError(
            f"d task_loss / d tokens is not finite (NaN/inf) for {int(nonfinite.sum())} token(s), first at (batch, "
            f"token) {nonfinite.nonzero()[:5].tolist()}, although task_loss is finite: its backward pass overflowed "
            f"in {grads.dtype} (compute the loss in float32)"
        )
    return feedback_scores_from_gradients(grads, alpha_var)
