"""Phase 3b of DeFT: the Recoverable Token Dictionary (RTD) and its reconstruct-or-not rule.

Pruned tokens are encoded to a `token_dim // bottleneck_ratio` code (the dictionary entry) and decoded back
to `token_dim` when the model is uncertain. The rule, shared by `DeFTModule` and the LLaVA model:

    p = softmax(logits);  H~ = -sum p log p / log(V)  (entropy normalised to [0, 1]);  c = max p
    uncertain  <=>  H~ > entropy_threshold  OR  c < confidence_threshold

- `hybrid`: logits `(batch, N, V)` are read per token, and each *pruned* token whose own distribution is
  uncertain is reconstructed; logits `(batch, V)` are read per sample, and every pruned token of an
  uncertain sample is reconstructed; without logits every pruned token is reconstructed.
- `adaptive`: one decision per sample (logits required): with `(batch, V)` logits that sample's
  distribution decides; with `(batch, N, V)` the mean of H~ and of c over the sample's valid tokens decide.
  An uncertain sample gets all its pruned tokens back, a certain one none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TokenDictionary(nn.Module):
    """Linear encoder `token_dim -> token_dim // bottleneck_ratio` and linear decoder back."""

    def __init__(self, token_dim: int, bottleneck_ratio: int):
        super().__init__()
        code_dim = max(1, token_dim // bottleneck_ratio)
        self.encoder = nn.Linear(token_dim, code_dim)
        self.decoder = nn.Linear(code_dim, token_dim)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(..., token_dim)` -> codes `(..., code_dim)` in the weights' dtype (tokens are cast to it)."""
        return self.encoder(tokens.to(self.encoder.weight.dtype))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """`(..., code_dim)` -> reconstructed tokens `(..., token_dim)` in the weights' dtype."""
        return self.decoder(codes.to(self.decoder.weight.dtype))

    def reconstruction_loss(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled mean squared error of `decode(encode(tokens))` against the (detached) tokens, over `mask` rows:

            loss = MSE / max(1, mean(tokens ** 2))      (the denominator is detached: a constant per call)

        Tokens of unit scale or smaller get the plain MSE. Larger tokens get the error relative to their own
        power, of order 1 whatever their magnitude: projected LLaVA features of magnitude ~1e3 gave a plain MSE
        of ~1e6, whose weight gradients overflowed float16 (max 65504) to inf, and which outweighed the language
        model loss by orders of magnitude. The optimum is the plain MSE's (a constant factor).
        """
        target = tokens.detach()
        err = (self.decode(self.encode(target)) - target).float().pow(2).mean(-1)  # (...,)
        power = target.float().pow(2).mean(-1)  # (...,) mean square of each token
        if mask is None:
            mse, scale = err.mean(), power.mean()
        else:
            count = mask.sum().clamp(min=1)
            mse, scale = (err * mask).sum() / count, (power * mask).sum() / count
        return mse / scale.clamp(min=1.0)


def uncertainty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised entropy and max probability over the last (vocabulary) axis.

    A `-inf` logit (an impossible word) has probability 0 and adds 0 to the entropy (`0 * log 0` is taken as 0,
    not NaN: a NaN entropy compares False and would make the distribution look certain)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    vocab = logits.shape[-1]
    plogp = torch.where(logp > float("-inf"), logp.exp() * logp, torch.zeros_like(logp))
    entropy = (-plogp.sum(-1) / (math.log(vocab) if vocab > 1 else 1.0)).clamp(0.0, 1.0)
    return entropy, logp.max(-1).values.exp()


def is_uncertain(logits: torch.Tensor, entropy_threshold: float, confidence_threshold: float) -> torch.Tensor:
    """Bool tensor of `logits.shape[:-1]`: the RTD rule above."""
    entropy, confidence = uncertainty(logits)
    return (entropy > entropy_threshold) | (confidence < confidence_threshold)


def sample_is_uncertain(
    logits: torch.Tensor,
    entropy_threshold: float,
    confidence_threshold: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample `(batch,)` decision from `(batch, V)` or `(batch, N, V)` logits (the `adaptive` rule)."""
    if logits.dim() == 2:
        return is_uncertain(logits, entropy_threshold, confidence_threshold)
    entropy, confidence = uncertainty(logits)  # (batch, N) each
    if token_mask is None:
        token_mask = torch.ones_like(entropy, dtype=torch.bool)
    count = token_mask.sum(1).clamp(min=1)
    mean_entropy = (entropy * token_mask).sum(1) / count
    mean_confidence = (confidence * token_mask).sum(1) / count
    return (mean_entropy > entropy_threshold) | (mean_confidence < confidence_threshold)


RTD_STATISTICS = ("entropy", "confidence")


def calibrate_thresholds(
    entropy: torch.Tensor,
    confidence: torch.Tensor,
    target_share: float,
    statistics: tuple[str, ...] = RTD_STATISTICS,
) -> dict:
    """RTD thresholds under which at most `target_share` of the given distributions are uncertain, as close
    to it as their values allow (the thresholds are model-specific: calibrate them on held-in data).

    `entropy` and `confidence` are the statistics the rule reads (`uncertainty(logits)`), one value per
    distribution (flattened: pruned tokens for `hybrid`, samples for `adaptive`). Both statistics are cut at
    the same rank m: `entropy_threshold` is the (n - m)-th smallest entropy (the m highest lie above it) and
    `confidence_threshold` the (m + 1)-th smallest confidence (the m lowest lie below it); m is the largest
    rank whose union (the rule's OR) flags at most `round(target_share * n)` distributions. Ties flag fewer.
    `statistics=("entropy",)` disables the confidence test (threshold 0: nothing is below it) and
    `("confidence",)` the entropy test (threshold 1: the normalised entropy never exceeds it).

    Returns:
        dict with `entropy_threshold`, `confidence_threshold` (floats in [0, 1], for
        `deft_rtd_entropy_threshold` / `deft_rtd_confidence_threshold`), `share` (the share flagged with them)
        and `target_share`.

    Raises:
        ValueError: empty or mismatched inputs, non-finite values, a share outside [0, 1] or unknown statistics.
    """
    if (
        isinstance(target_share, bool)
        or not isinstance(target_share, (int, float))
        or not 0 <= target_share <= 1
    ):
        raise ValueError(f"target_share must be a number in [0, 1], got {target_share!r}")
    statistics = tuple(statistics)
    if not statistics or any(s not in RTD_STATISTICS for s in statistics):
        raise ValueError(f"statistics must be a non-empty subset of {RTD_STATISTICS}, got {statistics!r}")
    entropy = torch.as_tensor(entropy, dtype=torch.float64).flatten()
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    if entropy.numel() == 0 or entropy.shape != confidence.shape:
        raise ValueError(
            f"entropy and confidence must be non-empty and of one length, got {entropy.numel()} and "
            f"{confidence.numel()} values"
        )
    if not bool(torch.isfinite(entropy).all() & torch.isfinite(confidence).all()):
        raise ValueError("entropy and confidence must be finite")
    n = entropy.numel()
    target = round(float(target_share) * n)
    e_sorted, c_sorted = entropy.sort().values, confidence.sort().values

    def thresholds(m: int) -> tuple[float, float]:
        t_e, t_c = (0.0, 1.0) if m >= n else (float(e_sorted[n - m - 1]), float(c_sorted[m]))
        return (t_e if "entropy" in statistics else 1.0), (t_c if "confidence" in statistics else 0.0)

    def flagged(m: int) -> int:
        t_e, t_c = thresholds(m)
        return int(((entropy > t_e) | (confidence < t_c)).sum())

    low, high = 0, n  # flagged(m) never decreases with m; find the largest m with flagged(m) <= target
    if flagged(n) <= target:
        low = n
    while low < high:
        mid = (low + high + 1) // 2
        if flagged(mid) <= target:
            low = mid
        else:
            high = mid - 1
    t_e, t_c = thresholds(low)
    return {
        "entropy_threshold": t_e,
        "confidence_threshold": t_c,
        "share": flagged(low) / n,
        "target_share": float(target_share),
    }
