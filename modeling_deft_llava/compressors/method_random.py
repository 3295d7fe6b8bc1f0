"""Random pruning baseline: keep K patches drawn uniformly without replacement, in patch order."""

from __future__ import annotations

import torch

from .compression_method import NoSettings
from .token_compressor import CompressionContext, CompressionResult, TokenCompressor, gather_tokens


def random_indices(num_patches: int, num_kept: int, seed: int) -> torch.Tensor:
    """`(num_kept,)` ascending patch indices: the first K of `torch.randperm(N)` under `manual_seed(seed)`.

    The generator lives on the CPU so that the draw is the same on every device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(num_patches, generator=generator)[:num_kept].sort().values


class DeftLlavaRandomCompressor(TokenCompressor):
    """Keep K patches chosen at random: the common lower baseline of token pruning papers.

    Every row uses a fresh generator seeded with `context.seed`, so a row's choice depends only on the seed
    and N, never on the other rows of the batch (all rows of one call keep the same patches).
    """

    name = "random"
    token_layouts = ("grid", "sequence")  # never reads 2-D neighbours
    settings_class = NoSettings

    def compress(self, image_features: torch.Tensor, context: CompressionContext) -> CompressionResult:
        batch, num_patches, _ = image_features.shape
        kept = random_indices(num_patches, context.num_kept, context.seed).to(image_features.device)
        kept = kept.unsqueeze(0).expand(batch, -1)  # (batch, K)
        return CompressionResult(tokens=gather_tokens(image_features, kept), kept_indices=kept)
