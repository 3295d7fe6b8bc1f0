"""The video digits task: a short video of real handwritten-digit frames, questions about one frame, counts over
time and order.

Each frame is a canvas of the easy task (`data.py`): 64x64, one real digit (8x8 from `load_digits`, upscaled 2x)
at a random position in the left half and one in the right half, so a frame is 64 visual tokens and the vision
tower of `checkpoints/digits-llava-base` already reads it. A video is `FRAMES` (4) such frames, 256 visual tokens
behind one `<video>` placeholder; ink covers ~17% of them (~11 per frame), so at 12.5% (8 per frame on average)
a method must choose among evidence tokens. (4 frames, not more: the CPU budget of training a model on them; the
generator takes `frames=`.)

Question kinds (drawn uniformly; frames are numbered 1..4)
----------------------------------------------------------
* ``frame``: ``"what digit is on the left in frame 3 ?"`` -> ``"7"``. Evidence: one digit of one frame.
* ``count``: ``"how many 7 are there ?"`` -> ``"2"`` (over all 8 digits of the video). The asked digit is one
  of the video's digits half of the time, else uniform over 0..9. Evidence: every digit.
* ``order``: ``"which comes first 2 or 5 ?"`` -> ``"2"``: two different digits of the video, the answer is the
  one seen first (frame order; left before right inside a frame); the two are named in random order.
  Evidence: the digits up to the answer's first occurrence.

Samples are a pure function of ``(split, index, seed)``; frames only use source images of the split (the easy
task's fixed 80/20 split), so held-out videos never share a source image with training.

Patch metadata: ``ink_masks`` `(frames, 2, 8, 8)` bool (left/right digit of each frame, the easy task's ink
threshold), ``background_mask`` `(frames, 8, 8)`, ``asked`` the `(frame, side)` digits the answer needs.
Visual token of frame f, patch p (row-major): ``f * 64 + p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import (
    CANVAS,
    DIGIT_SIZE,
    GRID,
    INK_THRESHOLD,
    SIDES,
    DigitsSplit,
    _digits,
    _patch_mass,
    canvas_rgb,
    paste_digit,
    source_indices,
)

FRAMES = 4
TOKENS_PER_FRAME = GRID * GRID
KINDS = ("frame", "count", "order")
TEMPLATES = {
    "frame": "what digit is on the {side} in frame {frame} ?",
    "count": "how many {digit} are there ?",
    "order": "which comes first {a} or {b} ?",
}
WORDS = ["USER", "ASSISTANT", ":", "?", "what", "digit", "is", "on", "the", "left", "right"]
WORDS += [str(d) for d in range(10)]  # the easy task's vocabulary first: its token ids stay the same
WORDS += sorted(
    {w for t in TEMPLATES.values() for w in t.split() if not w.startswith("{") and w not in WORDS}
)
WORDS += [str(n) for n in range(10, 2 * FRAMES + 1)]  # counts above 9 (none with 4 frames)
MAX_ANSWER_TOKENS = 1
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class VideoSample:
    frames: list  # FRAMES arrays (64, 64, 3) uint8
    question: str
    answer: str
    kind: str  # one of KINDS
    digits: np.ndarray  # (frames, 2) int64: left and right digit of each frame
    sources: np.ndarray  # (frames, 2) int64, index into load_digits()
    asked: tuple[tuple[int, int], ...]  # (frame, side) of the digits the answer needs (side 0 left, 1 right)
    ink_masks: np.ndarray  # (frames, 2, 8, 8) bool
    background_mask: np.ndarray  # (frames, 8, 8) bool

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def ink_tokens(self, which: str = "all") -> np.ndarray:
        """Video-token indices (``frame * 64 + patch``) of ink patches: of every digit (``"all"``), of the
        digits the answer needs (``"asked"``), or of the others without any token that also holds asked ink
        (``"other"``)."""
        asked = np.zeros_like(self.ink_masks)
        for f, s in self.asked:
            asked[f, s] = self.ink_masks[f, s]
        asked = asked.any(axis=1)  # (frames, 8, 8)
        every = self.ink_masks.any(axis=1)
        masks = {"all": every, "asked": asked, "other": every & ~asked}
        if which not in masks:
            raise ValueError(f"which must be one of {sorted(masks)}, got {which!r}")
        return np.flatnonzero(masks[which].reshape(-1))

    def frame_tokens(self, frames) -> np.ndarray:
        """Every token of the given frames (0-based)."""
        return np.concatenate(
            [np.arange(f * TOKENS_PER_FRAME, (f + 1) * TOKENS_PER_FRAME) for f in sorted(set(frames))]
        )

    def background_tokens(self) -> np.ndarray:
        return np.flatnonzero(self.background_mask.reshape(-1))

    def pil_frames(self) -> list:
        from PIL import Image

        return [Image.fromarray(f, mode="RGB") for f in self.frames]


def _first_seen(digits: np.ndarray) -> dict:
    """Digit -> (frame, side) of its first occurrence, reading frames in order, left before right."""
    first = {}
    for f in range(digits.shape[0]):
        for s in range(2):
            first.setdefault(int(digits[f, s]), (f, s))
    return first


def _question(kind: str, digits: np.ndarray, rng: np.random.Generator):
    """(question, answer, asked (frame, side) pairs) of one kind for a (frames, 2) array of digits."""
    frames = digits.shape[0]
    if kind == "frame":
        f, s = int(rng.integers(0, frames)), int(rng.integers(0, 2))
        return TEMPLATES[kind].format(side=SIDES[s], frame=f + 1), str(int(digits[f, s])), ((f, s),)
    if kind == "count":
        f, s = int(rng.integers(0, frames)), int(rng.integers(0, 2))
        digit = int(digits[f, s]) if rng.random() < 0.5 else int(rng.integers(0, 10))
        asked = tuple((int(a), int(b)) for a, b in zip(*np.nonzero(digits == digit)))
        return TEMPLATES[kind].format(digit=digit), str(len(asked)), asked
    if kind == "order":
        first = _first_seen(digits)
        present = sorted(first)
        if len(present) < 2:  # every digit the same (kept total: then a frame question)
            return _question("frame", digits, rng)
        a, b = (int(v) for v in rng.choice(present, size=2, replace=False))
        winner = a if first[a] < first[b] else b
        last = max(first[a], first[b])  # the evidence: every digit up to the later first occurrence
        asked = tuple((f, s) for f in range(frames) for s in range(2) if (f, s) <= last)
        return TEMPLATES[kind].format(a=a, b=b), str(winner), asked
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def make_sample(
    split: str, index: int, seed: int, kind: str | None = None, frames: int = FRAMES
) -> VideoSample:
    """The `index`-th video of `split` for `seed` (pure function of its arguments). `kind` forces a question
    kind (the frames stay the same)."""
    images, targets = _digits()
    pool = source_indices(split)
    rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index), 3])  # 3: the video task
    sources = pool[rng.integers(0, len(pool), size=(frames, 2))].astype(np.int64)
    half = CANVAS // 2
    canvases, ink = [], np.zeros((frames, 2, GRID, GRID), dtype=np.float32)
    for f in range(frames):
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
        for s in range(2):
            x = s * half + int(rng.integers(0, half - DIGIT_SIZE + 1))
            y = int(rng.integers(0, CANVAS - DIGIT_SIZE + 1))
            layer = paste_digit(images[sources[f, s]], x, y)
            canvas += layer  # the halves meet on a patch boundary: no pixel gets ink twice
            ink[f, s] = _patch_mass(layer)
        canvases.append(canvas_rgb(canvas))
    digits = targets[sources].astype(np.int64)
    drawn = KINDS[int(rng.integers(0, len(KINDS)))]
    question, answer, asked = _question(kind or drawn, digits, rng)
    return VideoSample(
        frames=canvases,
        question=question,
        answer=answer,
        kind=kind or drawn,
        digits=digits,
        sources=sources,
        asked=asked,
        ink_masks=ink >= INK_THRESHOLD,
        background_mask=ink.sum(axis=1) == 0,
    )


def make_split(split: str, num_samples: int, seed: int) -> DigitsSplit:
    """`num_samples` deterministic videos of `split` ('train' or 'test') for `seed`."""
    return DigitsSplit(split, num_samples, seed, maker=make_sample)


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    """The conversation: the question before the video (as the easy task: `data.QUESTION_FIRST`)."""
    messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "video"}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


if __name__ == "__main__":
    test = make_split("test", 500, seed=1234)
    ink = np.mean([len(s.ink_tokens("all")) for s in test])
    print(f"ink tokens per video {ink:.1f} of {FRAMES * TOKENS_PER_FRAME}")
    for kind in KINDS:
        answers = [s.answer for s in test if s.kind == kind]
        top = max(set(answers), key=answers.count)
        print(kind, len(answers), "majority answer", top, answers.count(top) / len(answers))
    s = test[0]
    print(s.question, "->", s.answer, "| digits", s.digits.tolist())
