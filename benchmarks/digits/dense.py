"""The dense digits task: nine real handwritten digits on one canvas, questions about one, a row or all of them.

The easy task (`data.py`) puts two digits on a 64x64 canvas: their ink covers about 11 of the 64 visual tokens
(17%), so at a 25% budget every ink-finding method keeps all the evidence and methods tie. Here the same canvas
holds a 3x3 grid of digits, so ink covers most tokens and a budget of 25% or 12.5% must choose among them.

Layout of one sample
--------------------
* Canvas: 64x64 grayscale, background 0, ink = digit intensity * 255 / 16, returned as RGB ``uint8`` (64, 64, 3),
  like the easy task (same vision tower input, same 8x8 patches, 64 visual tokens, token = row * 8 + col).
* A 3x3 grid of cells; cell ``(r, c)`` spans pixels ``CELL_EDGES[r] .. CELL_EDGES[r + 1]`` vertically and
  ``CELL_EDGES[c] .. CELL_EDGES[c + 1]`` horizontally (edges 0, 21, 43, 64). Each cell holds one source digit
  (8x8 from `load_digits`, upscaled 2x nearest to 16x16) at a random offset inside the cell (0..5 or 0..6 pixels
  on each axis), so digits never overlap, but one 8x8 patch can hold ink of two neighbouring digits.
* Source images come from the same fixed 80/20 split as the easy task (`data.source_indices`): held-out samples
  never share a source image with training.

Question kinds (drawn uniformly; rows and columns are numbered 1..3 from the top / the left)
---------------------------------------------------------------------------------------------
* ``cell``: ``"what digit is in row 2 column 3 ?"`` -> ``"7"``. Evidence: that one digit.
* ``count``: ``"how many 7 are there ?"`` -> ``"2"``. The asked digit is the digit of a random cell half of the
  time (count >= 1), else uniform over 0..9. Evidence: all nine digits.
* ``largest``: ``"what is the largest digit in row 1 ?"`` -> ``"8"``. Evidence: the three digits of that row.
* ``read``: ``"read row 2 left to right"`` -> ``"4 0 7"`` (three answer tokens). Evidence: that row.

Patch metadata
--------------
* ``ink_mass``: (9, 8, 8) float32, per cell (row-major ``r * 3 + c``), the digit's canvas intensity summed inside
  each patch (source units, 0..16 per canvas pixel), as in the easy task.
* ``ink_masks``: (9, 8, 8) bool, ``ink_mass >= INK_THRESHOLD`` (the easy task's threshold, one full-ink pixel).
* ``background_mask``: (8, 8) bool, patches without any ink.
* ``asked_cells``: the cells whose digits the answer needs (the evidence above).

Samples are a pure function of ``(split, index, seed)`` (``make_split("test", 1000, seed=1234)[i]`` is the same
sample on every machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import (
    CANVAS,
    DIGIT_SIZE,
    GRID,
    INK_THRESHOLD,
    DigitsSplit,
    _digits,
    _patch_mass,
    canvas_rgb,
    paste_digit,
    source_indices,
)

CELLS = 3  # a 3x3 grid of digits
CELL_EDGES = tuple(round(i * CANVAS / CELLS) for i in range(CELLS + 1))  # (0, 21, 43, 64)
KINDS = ("cell", "count", "largest", "read")
TEMPLATES = {
    "cell": "what digit is in row {row} column {col} ?",
    "count": "how many {digit} are there ?",
    "largest": "what is the largest digit in row {row} ?",
    "read": "read row {row} left to right",
}
WORDS = ["USER", "ASSISTANT", ":", "?"] + sorted(
    {w for t in TEMPLATES.values() for w in t.split() if not w.startswith("{") and w != "?"}
)
WORDS += [str(d) for d in range(10)]
MAX_ANSWER_TOKENS = CELLS  # "read" answers one digit per column
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class DenseSample:
    image: np.ndarray  # (64, 64, 3) uint8
    question: str
    answer: str
    kind: str  # one of KINDS
    digits: np.ndarray  # (3, 3) int64, the digit of each cell
    sources: np.ndarray  # (3, 3) int64, index into load_digits()
    offsets: np.ndarray  # (3, 3, 2) int64, top-left (x, y) of each 16x16 digit on the canvas
    asked_cells: tuple[int, ...]  # row-major cell indices (r * 3 + c) the answer needs
    ink_mass: np.ndarray  # (9, 8, 8) float32
    ink_masks: np.ndarray  # (9, 8, 8) bool
    background_mask: np.ndarray  # (8, 8) bool

    @property
    def ink_mask(self) -> np.ndarray:
        """Patches holding more than a little ink of any digit, (8, 8) bool."""
        return self.ink_masks.any(axis=0)

    def ink_tokens(self, which: str = "all") -> np.ndarray:
        """Visual-token indices of ink patches: of every digit (``"all"``), of the digits the answer needs
        (``"asked"``), or of the other digits only, without any token that also holds asked ink (``"other"``)."""
        asked = self.ink_masks[list(self.asked_cells)].any(axis=0)
        masks = {"all": self.ink_mask, "both": self.ink_mask, "asked": asked, "other": self.ink_mask & ~asked}
        if which not in masks:
            raise ValueError(f"which must be one of {sorted(masks)}, got {which!r}")
        return np.flatnonzero(masks[which].reshape(-1))

    def background_tokens(self) -> np.ndarray:
        return np.flatnonzero(self.background_mask.reshape(-1))

    def pil_image(self):
        from PIL import Image

        return Image.fromarray(self.image, mode="RGB")

    def patch_labels(self) -> np.ndarray:
        """Stage-1 supervision, (64,) int64: the digit 0..9 of an ink patch, 10 for pure background, -100
        (ignored) for a little ink below the threshold or ink of two different digits above it."""
        labels = np.full(GRID * GRID, -100, dtype=np.int64)
        labels[self.background_mask.reshape(-1)] = 10
        inked = self.ink_masks.reshape(CELLS * CELLS, -1)  # (9, 64)
        classes = np.where(inked, self.digits.reshape(-1, 1), -1)  # (9, 64) digit where inked
        for token in np.flatnonzero(inked.any(axis=0)):
            found = set(classes[:, token][classes[:, token] >= 0].tolist())
            if len(found) == 1:
                labels[token] = found.pop()
        return labels


def _question(kind: str, digits: np.ndarray, rng: np.random.Generator) -> tuple[str, str, tuple[int, ...]]:
    """(question, answer, asked cells) of one kind for a (3, 3) grid of digits."""
    row, col = (int(v) for v in rng.integers(0, CELLS, size=2))
    if kind == "cell":
        answer = str(digits[row, col])
        return TEMPLATES[kind].format(row=row + 1, col=col + 1), answer, (row * CELLS + col,)
    row_cells = tuple(row * CELLS + c for c in range(CELLS))
    if kind == "largest":
        return TEMPLATES[kind].format(row=row + 1), str(int(digits[row].max())), row_cells
    if kind == "read":
        return TEMPLATES[kind].format(row=row + 1), " ".join(str(int(d)) for d in digits[row]), row_cells
    if kind == "count":
        digit = int(digits[row, col]) if rng.random() < 0.5 else int(rng.integers(0, 10))
        count = int((digits == digit).sum())
        return TEMPLATES[kind].format(digit=digit), str(count), tuple(range(CELLS * CELLS))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def make_sample(split: str, index: int, seed: int, kind: str | None = None) -> DenseSample:
    """The `index`-th sample of `split` for `seed` (pure function of its arguments). `kind` forces a question
    kind (the canvas stays the same; only tests and per-kind checks use it)."""
    images, targets = _digits()
    pool = source_indices(split)
    rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index), 2])  # 2: the dense task
    sources = pool[rng.integers(0, len(pool), size=(CELLS, CELLS))].astype(np.int64)
    offsets = np.zeros((CELLS, CELLS, 2), dtype=np.int64)
    ink_mass = np.zeros((CELLS * CELLS, GRID, GRID), dtype=np.float32)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    for r in range(CELLS):
        for c in range(CELLS):
            x0, y0 = CELL_EDGES[c], CELL_EDGES[r]
            x = x0 + int(rng.integers(0, CELL_EDGES[c + 1] - x0 - DIGIT_SIZE + 1))
            y = y0 + int(rng.integers(0, CELL_EDGES[r + 1] - y0 - DIGIT_SIZE + 1))
            offsets[r, c] = (x, y)
            layer = paste_digit(images[sources[r, c]], x, y)
            canvas += layer  # cells do not overlap: no pixel gets ink twice
            ink_mass[r * CELLS + c] = _patch_mass(layer)
    digits = targets[sources].astype(np.int64)
    drawn_kind = KINDS[int(rng.integers(0, len(KINDS)))]
    question, answer, asked = _question(kind or drawn_kind, digits, rng)
    return DenseSample(
        image=canvas_rgb(canvas),
        question=question,
        answer=answer,
        kind=kind or drawn_kind,
        digits=digits,
        sources=sources,
        offsets=offsets,
        asked_cells=asked,
        ink_mass=ink_mass,
        ink_masks=ink_mass >= INK_THRESHOLD,
        background_mask=ink_mass.sum(axis=0) == 0,
    )


def make_split(split: str, num_samples: int, seed: int) -> DigitsSplit:
    """`num_samples` deterministic dense samples of `split` ('train' or 'test') for `seed`."""
    return DigitsSplit(split, num_samples, seed, maker=make_sample)


if __name__ == "__main__":
    test = make_split("test", 500, seed=1234)
    ink = np.mean([len(s.ink_tokens("all")) for s in test])
    asked = np.mean([len(s.ink_tokens("asked")) for s in test])
    print(f"ink tokens per canvas {ink:.1f} of 64; asked-digit ink {asked:.1f}")
    s = test[0]
    print(s.question, "->", s.answer, "| digits", s.digits.tolist())
