"""Deterministic two-digit visual-question-answering samples built from scikit-learn's `load_digits`.

Layout of one sample
--------------------
* Canvas: 64x64 grayscale, background 0 (black), ink = digit intensity * 255 / 16 (white ink), returned
  as an RGB ``uint8`` array of shape (64, 64, 3) (the three channels are equal) and, on request, a PIL image.
* Two source digits (8x8, intensities 0..16) are upscaled 2x with nearest-neighbour repetition (lossless)
  to 16x16. One is pasted at a random position inside the left half (x in [0, 16], y in [0, 48]), the other
  inside the right half (x in [32, 48], y in [0, 48]). The halves meet on a patch boundary (x = 32), so no
  8x8 patch ever holds ink of both digits.
* Question: ``"what digit is on the left ?"`` or ``"what digit is on the right ?"`` (side drawn 50/50);
  answer: the digit of that side, ``"0"`` .. ``"9"``.

Patch metadata (the vision tower uses 8x8 patches, so the canvas is an 8x8 grid of 64 visual tokens,
row-major, token index = row * 8 + col):
* ``ink_mass_left`` / ``ink_mass_right``: (8, 8) float arrays, the sum of that digit's canvas intensities
  inside each patch, in source units (0..16 per canvas pixel; a full-ink canvas pixel counts 16).
* ``ink_mask_left`` / ``ink_mask_right``: patches that hold "more than a little" ink of that digit:
  ``ink_mass >= INK_THRESHOLD`` (= 16, i.e. at least the ink of one full-intensity canvas pixel; one
  source pixel covers 2x2 canvas pixels). On average about 11 of the 64 patches are ink patches.
* ``background_mask``: patches that hold no ink at all (ink mass 0 from both digits).
Patches with some ink below the threshold belong to neither ink masks nor the background mask.

Splits
------
The 1,797 source images are permuted with a fixed seed (``SPLIT_SEED``) and split 80/20 into ``train``
(1,438 images) and ``test`` (359 images). Samples of a split only ever use source images of that split,
so held-out samples never share a source image with training. Samples are generated lazily and
deterministically from ``(seed, split, index)``: ``make_split("test", 1000, seed=1234)[i]`` is the same
sample on every machine and every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CANVAS = 64
PATCH = 8
GRID = CANVAS // PATCH  # 8x8 = 64 visual tokens
SCALE = 2  # 8x8 source digit -> 16x16 on the canvas
DIGIT_SIZE = 8 * SCALE
INK_THRESHOLD = 16.0  # patch ink mass (0..16 units per canvas pixel) for "more than a little ink"
SPLIT_SEED = 20240601
TRAIN_FRACTION = 0.8
SIDES = ("left", "right")
QUESTION_TEMPLATE = "what digit is on the {side} ?"
# every word the prompts and answers use (for the word-level tokenizer)
WORDS = ["USER", "ASSISTANT", ":", "?", "what", "digit", "is", "on", "the", "left", "right"] + [
    str(d) for d in range(10)
]
_SPLIT_CODES = {"train": 0, "test": 1}
# Prompt order: the question comes BEFORE the image. Measured (3000 stage-2 steps, 2000 held-out queries):
# with the image first the tiny LLaVA never learned which side was asked (53.25%; it named one of the two
# digits at random); with the question first the image tokens can read the side when they are encoded.
QUESTION_FIRST = True


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=2)
def source_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of the source images of `split` (fixed, seeded 80/20 split)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, _ = _digits()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    n_train = int(round(TRAIN_FRACTION * len(images)))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return np.sort(idx)


@dataclass
class DigitsSample:
    image: np.ndarray  # (64, 64, 3) uint8
    question: str
    answer: str
    side: str
    left_digit: int
    right_digit: int
    left_source: int  # index into load_digits()
    right_source: int
    left_xy: tuple[int, int]  # top-left (x, y) of the 16x16 digit on the canvas
    right_xy: tuple[int, int]
    ink_mass_left: np.ndarray  # (8, 8) float32
    ink_mass_right: np.ndarray
    ink_mask_left: np.ndarray  # (8, 8) bool
    ink_mask_right: np.ndarray
    background_mask: np.ndarray  # (8, 8) bool, no ink at all

    @property
    def ink_mask(self) -> np.ndarray:
        """Patches holding more than a little ink of either digit, (8, 8) bool."""
        return self.ink_mask_left | self.ink_mask_right

    def ink_tokens(self, which: str = "both") -> np.ndarray:
        """Visual-token indices (row * 8 + col) of ink patches of 'left', 'right' or 'both' digits; the
        task-neutral names the dense task shares: 'all' (= 'both'), 'asked' (the asked side), 'other'."""
        other = "right" if self.side == "left" else "left"
        which = {"all": "both", "asked": self.side, "other": other}.get(which, which)
        mask = {"left": self.ink_mask_left, "right": self.ink_mask_right, "both": self.ink_mask}[which]
        return np.flatnonzero(mask.reshape(-1))

    @property
    def kind(self) -> str:
        """The question kind (the easy task has one: which side)."""
        return "side"

    def background_tokens(self) -> np.ndarray:
        return np.flatnonzero(self.background_mask.reshape(-1))

    def pil_image(self):
        from PIL import Image

        return Image.fromarray(self.image, mode="RGB")

    def patch_labels(self) -> np.ndarray:
        """Stage-1 supervision, (64,) int64: digit 0..9 for ink patches, 10 for pure background, -100
        (ignored) for patches with a little ink below the threshold. The side is NOT encoded."""
        labels = np.full((GRID, GRID), -100, dtype=np.int64)
        labels[self.background_mask] = 10
        labels[self.ink_mask_left] = self.left_digit
        labels[self.ink_mask_right] = self.right_digit
        return labels.reshape(-1)


def _patch_mass(layer: np.ndarray) -> np.ndarray:
    return layer.reshape(GRID, PATCH, GRID, PATCH).sum(axis=(1, 3))  # (8, 8) ink per patch


def paste_digit(digit: np.ndarray, x: int, y: int) -> np.ndarray:
    """A (64, 64) float32 layer holding one 8x8 source digit (0..16), upscaled 2x nearest, at top-left (x, y)."""
    layer = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    layer[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = np.kron(digit, np.ones((SCALE, SCALE), dtype=np.float32))
    return layer


def canvas_rgb(canvas: np.ndarray) -> np.ndarray:
    """(64, 64) ink in source units (0..16) -> (64, 64, 3) uint8 RGB, white ink on black."""
    gray = np.round(canvas * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def make_sample(split: str, index: int, seed: int) -> DigitsSample:
    """The `index`-th sample of `split` for `seed` (pure function of its arguments)."""
    images, targets = _digits()
    pool = source_indices(split)
    rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])
    left_src, right_src = (int(pool[i]) for i in rng.integers(0, len(pool), size=2))
    half = CANVAS // 2
    max_x = half - DIGIT_SIZE
    max_y = CANVAS - DIGIT_SIZE
    left_xy = (int(rng.integers(0, max_x + 1)), int(rng.integers(0, max_y + 1)))
    right_xy = (half + int(rng.integers(0, max_x + 1)), int(rng.integers(0, max_y + 1)))
    side = SIDES[int(rng.integers(0, 2))]

    layers = [paste_digit(images[src], x, y) for src, (x, y) in ((left_src, left_xy), (right_src, right_xy))]
    canvas = np.clip(layers[0] + layers[1], 0, 16)
    mass_l, mass_r = _patch_mass(layers[0]), _patch_mass(layers[1])
    left_digit, right_digit = int(targets[left_src]), int(targets[right_src])
    return DigitsSample(
        image=canvas_rgb(canvas),
        question=QUESTION_TEMPLATE.format(side=side),
        answer=str(left_digit if side == "left" else right_digit),
        side=side,
        left_digit=left_digit,
        right_digit=right_digit,
        left_source=left_src,
        right_source=right_src,
        left_xy=left_xy,
        right_xy=right_xy,
        ink_mass_left=mass_l,
        ink_mass_right=mass_r,
        ink_mask_left=mass_l >= INK_THRESHOLD,
        ink_mask_right=mass_r >= INK_THRESHOLD,
        background_mask=(mass_l + mass_r) == 0,
    )


class DigitsSplit(Sequence):
    """A lazy, deterministic sequence of `num_samples` samples (generated on access, nothing stored).
    `maker(split, index, seed)` builds one sample: this module's `make_sample` (the easy task) by default."""

    def __init__(self, split: str, num_samples: int, seed: int, maker=None):
        source_indices(split)  # validates the split name
        self.split, self.num_samples, self.seed = split, int(num_samples), int(seed)
        self.maker = maker or make_sample

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.maker(self.split, index, self.seed)


def make_split(split: str, num_samples: int, seed: int) -> DigitsSplit:
    """`num_samples` deterministic samples of `split` ('train' or 'test') for `seed`."""
    return DigitsSplit(split, num_samples, seed)


def user_text(question: str) -> str:
    """The user turn as one string (LLaVA conversation files), rendered like `chat_messages`' content."""
    return question + "<image>\n" if QUESTION_FIRST else "<image>\n" + question


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    """The conversation for the processor's chat template (one image, one question, optional answer)."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    if QUESTION_FIRST:
        content.reverse()
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


if __name__ == "__main__":
    tr, te = source_indices("train"), source_indices("test")
    print(f"source images: train {len(tr)}, test {len(te)}, shared {len(np.intersect1d(tr, te))}")
    s = make_split("test", 5, seed=0)[0]
    print(s.question, "->", s.answer, "| left", s.left_digit, "right", s.right_digit)
    print("ink tokens", s.ink_tokens().tolist(), "background tokens", len(s.background_tokens()))
    print(s.patch_labels().reshape(GRID, GRID))
