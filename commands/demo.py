"""The bare DeFTModule demo (untrained): DeFT compression on a built-in real image, printing what was kept.

    python -m modeling_deft_llava.commands.demo [--retention-ratio 0.25] [--patch 32]

Uses scikit-learn's bundled photo (`china.jpg`, no download) cut into a patch grid; each patch's pixels are
one token. The DeFT module here is untrained (random SAM/saliency weights), so this shows the mechanics, not
a learned selection: the trained, compressed LLaVA inference lives in `benchmarks/` (see README).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..deft.deft_module import DeFTModule


def image_tokens(patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """scikit-learn's china.jpg as `(1, rows * cols, patch * patch * 3)` tokens and its `(rows, cols)` grid."""
    try:
        from sklearn.datasets import load_sample_image  # optional: the `bench`/`dev` extras
    except ImportError:
        raise SystemExit(
            'error: the demo reads scikit-learn\'s bundled photo: pip install scikit-learn (or ".[bench]")'
        ) from None

    image = load_sample_image("china.jpg").astype(np.float32) / 255.0  # (427, 640, 3)
    rows, cols = image.shape[0] // patch, image.shape[1] // patch
    image = image[: rows * patch, : cols * patch]
    grid = image.reshape(rows, patch, cols, patch, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, p, p, 3)
    return torch.from_numpy(grid.reshape(1, rows * cols, -1).copy()), (rows, cols)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--retention-ratio", type=float, default=None, help="default: the DeFT default (0.482)"
    )
    parser.add_argument("--patch", type=int, default=32, help="patch size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tokens, (rows, cols) = image_tokens(args.patch)
    deft = (
        DeFTModule(token_dim=tokens.shape[-1])
        if args.retention_ratio is None
        else DeFTModule(token_dim=tokens.shape[-1], retention_ratio=args.retention_ratio)
    )
    with torch.no_grad():
        out = deft(tokens=tokens, modality="image", spatial_shape=(rows, cols), inference_mode="fast")
    kept = set(out.kept_indices[0].tolist())
    print(f"image: sklearn china.jpg, {rows}x{cols} patches of {args.patch}px -> {tokens.shape[1]} tokens")
    print(f"DeFT kept {len(kept)} of {tokens.shape[1]} tokens ({len(kept) / tokens.shape[1]:.1%})")
    weights = {k: round(float(v), 3) for k, v in out.scoring_info["mixture_weights"].items()}
    print(f"mixture weights: {weights}")
    print("kept map (# kept, . pruned):")
    for r in range(rows):
        print("  " + "".join("#" if r * cols + c in kept else "." for c in range(cols)))


if __name__ == "__main__":
    main()
