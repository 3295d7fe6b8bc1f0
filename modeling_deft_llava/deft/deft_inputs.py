"""Input checks of `DeFTModule.forward`: every tensor argument against `tokens` (type, shape, dtype, device, values).

A bad argument raises a `TypeError` (not a tensor, wrong dtype) or a `ValueError` (shape, device, values) that
names the argument, its shape and the shape `tokens` call for, before any stage runs: a gradient of batch 1 for
tokens of batch 2 used to broadcast silently, all-NaN logits made every token look certain, and an empty
vocabulary failed deep inside the RTD rule.
"""

from __future__ import annotations

import torch


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_tensor(name: str, value, tokens: torch.Tensor, floating: bool = True) -> None:
    """`value` is a tensor on `tokens`' device (floating-point unless `floating=False`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype} of shape {_shape(value)}")
    if value.device != tokens.device:
        raise ValueError(
            f"{name} is on {value.device} but tokens are on {tokens.device}: move it to {tokens.device}"
        )


def _first_positions(bad: torch.Tensor, count: int = 5) -> list[list[int]]:
    return bad.nonzero()[:count].tolist()


def check_tokens(tokens, token_dim: int) -> None:
    """`tokens` `(batch_size, num_tokens, token_dim)`, floating-point, finite."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(
            f"tokens must have shape (batch_size, num_tokens, token_dim), got rank {tokens.dim()} "
            f"shape {_shape(tokens)}"
        )
    if tokens.shape[-1] != token_dim:
        raise ValueError(
            f"tokens of shape {_shape(tokens)} have {tokens.shape[-1]} features but this DeFTModule was built "
            f"with token_dim={token_dim}"
        )
    if tokens.shape[1] < 1:
        raise ValueError(f"tokens must hold at least one token (num_tokens >= 1), got shape {_shape(tokens)}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be a floating-point tensor, got {tokens.dtype}")
    nonfinite = ~torch.isfinite(tokens).all(-1)  # (batch, N)
    if bool(nonfinite.any()):
        raise ValueError(
            f"tokens contain {int(nonfinite.sum())} non-finite token(s) (NaN/inf), first at (batch, token) "
            f"{_first_positions(nonfinite)}: DeFT refuses to rank them"
        )


def check_attention_mask(attention_mask, tokens: torch.Tensor, modality: str) -> None:
    """`attention_mask` `(batch_size, num_tokens)` of 0/1 (any dtype, bool included), padding for text only."""
    _check_tensor("attention_mask", attention_mask, tokens, floating=False)
    expected = _shape(tokens)[:2]
    if _shape(attention_mask) != expected:
        raise ValueError(
            f"attention_mask must have shape (batch_size, num_tokens) = {expected} for tokens of shape "
            f"{_shape(tokens)}, got {_shape(attention_mask)}"
        )
    if attention_mask.dtype != torch.bool:
        binary = (attention_mask == 0) | (attention_mask == 1)  # False on NaN too
        if not bool(binary.all()):
            values = sorted({str(v) for v in attention_mask[~binary].tolist()})[:5]
            raise ValueError(
                f"attention_mask must hold only 0 (padding) and 1 (token), got values {values} at "
                f"(batch, token) {_first_positions(~binary)}"
            )
    valid = attention_mask.bool()
    if modality != "text" and not bool(valid.all()):
        raise ValueError("attention_mask with padding is only supported for modality='text'")
    empty = ~valid.any(1)
    if bool(empty.any()):
        raise ValueError(
            f"every row of attention_mask must keep at least one token; rows {empty.nonzero().flatten().tolist()} "
            "are all padding"
        )


def check_token_gradients(token_gradients, tokens: torch.Tensor) -> None:
    """`token_gradients` `d loss / d tokens`: the shape of `tokens` exactly (no broadcasting), finite."""
    _check_tensor("token_gradients", token_gradients, tokens)
    if _shape(token_gradients) != _shape(tokens):
        raise ValueError(
            f"token_gradients must have the shape of tokens {_shape(tokens)} (one gradient per token feature, "
            f"d loss / d tokens), got {_shape(token_gradients)}"
        )
    nonfinite = ~torch.isfinite(token_gradients).all(-1)  # (batch, N)
    if bool(nonfinite.any()):
        raise ValueError(
            f"token_gradients contain {int(nonfinite.sum())} non-finite gradient(s) (NaN/inf), first at "
            f"(batch, token) {_first_positions(nonfinite)}: the feedback score cannot rank tokens by them "
            "(an overflowing task loss? compute it in float32)"
        )


def check_task_loss(task_loss, tokens: torch.Tensor, token_gradients) -> None:
    """`task_loss`: one finite scalar computed from `tokens`; never together with `token_gradients`."""
    if token_gradients is not None:
        raise ValueError(
            "pass task_loss or token_gradients, not both: each defines the feedback score (token_gradients "
            "is d task_loss / d tokens, precomputed)"
        )
    if not isinstance(task_loss, torch.Tensor) or task_loss.numel() != 1:
        raise ValueError(
            f"task_loss must be a scalar tensor, got {type(task_loss).__name__} {getattr(task_loss, 'shape', '')}"
        )
    if not task_loss.is_floating_point():
        raise TypeError(f"task_loss must be a floating-point scalar, got {task_loss.dtype}")
    if not bool(torch.isfinite(task_loss).all()):
        raise ValueError(
            f"task_loss is {task_loss.item()}: its gradient cannot rank tokens (compute the loss in float32)"
        )


def check_logits(logits, tokens: torch.Tensor) -> None:
    """`logits` `(batch_size, vocab)` or `(batch_size, num_tokens, vocab)`, vocab >= 1, no NaN or +inf, and
    at least one finite logit in each distribution (-inf marks an impossible word and is allowed)."""
    _check_tensor("logits", logits, tokens)
    batch, n, _ = tokens.shape
    expected = f"({batch}, vocab) or ({batch}, {n}, vocab) with vocab >= 1"
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must be {expected} for tokens of shape {_shape(tokens)}, got {_shape(logits)}"
        )
    if logits.shape[0] != batch or (logits.dim() == 3 and logits.shape[1] != n) or logits.shape[-1] < 1:
        raise ValueError(
            f"logits of shape {_shape(logits)} do not fit tokens {_shape(tokens)}: expected {expected}"
        )
    bad = (torch.isnan(logits) | (logits == float("inf"))).any(-1)  # (batch,) or (batch, N)
    if bool(bad.any()):
        raise ValueError(
            f"logits of shape {_shape(logits)} contain NaN or +inf in {int(bad.sum())} distribution(s), first at "
            f"{_first_positions(bad)}: the RTD rule cannot tell certain from uncertain there"
        )
    empty = ~torch.isfinite(logits).any(-1)
    if bool(empty.any()):
        raise ValueError(
            f"logits of shape {_shape(logits)} are all -inf in {int(empty.sum())} distribution(s), first at "
            f"{_first_positions(empty)}: a distribution needs at least one possible word"
        )


def check_question(question_embeds, question_mask, tokens: torch.Tensor, token_dim: int) -> None:
    """`question_embeds` `(batch, T, token_dim)` and a bool `question_mask` `(batch, T)` for `tokens`."""
    if not isinstance(question_embeds, torch.Tensor) or question_embeds.dim() != 3:
        raise ValueError(
            "question_embeds must be a (batch_size, question_tokens, token_dim) tensor, got "
            f"{getattr(question_embeds, 'shape', type(question_embeds).__name__)}"
        )
    if question_embeds.shape[0] != tokens.shape[0] or question_embeds.shape[2] != token_dim:
        raise ValueError(
            f"question_embeds {tuple(question_embeds.shape)} must be (batch_size={tokens.shape[0]}, T, "
            f"token_dim={token_dim})"
        )
    if (
        not isinstance(question_mask, torch.Tensor)
        or question_mask.dtype != torch.bool
        or tuple(question_mask.shape) != tuple(question_embeds.shape[:2])
    ):
        raise ValueError(
            f"question_mask must be a bool tensor of shape {tuple(question_embeds.shape[:2])} (True on the "
            f"question's tokens), got {getattr(question_mask, 'dtype', type(question_mask).__name__)} "
            f"{tuple(getattr(question_mask, 'shape', ()))}"
        )
