"""The dense digits task's generator (benchmarks/digits/dense.py): deterministic, answers right, masks right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks.digits import data, dense  # noqa: E402
from benchmarks.digits.data import wilson_interval  # noqa: E402
from benchmarks.digits.tasks import TASKS, get_task  # noqa: E402

SAMPLES = dense.make_split("test", 40, seed=5)


def test_same_arguments_give_the_same_sample():
    a, b = dense.make_sample("test", 3, seed=5), SAMPLES[3]
    assert np.array_equal(a.image, b.image) and (a.question, a.answer) == (b.question, b.answer)
    other = dense.make_sample("test", 3, seed=6)
    assert not np.array_equal(a.image, other.image)
    assert len(SAMPLES[:5]) == 5 and SAMPLES[-1].question == SAMPLES[39].question


def test_splits_use_disjoint_source_images():
    train = {int(v) for s in dense.make_split("train", 20, seed=5) for v in s.sources.ravel()}
    test = {int(v) for s in SAMPLES for v in s.sources.ravel()}
    assert train <= set(data.source_indices("train").tolist())
    assert test <= set(data.source_indices("test").tolist())
    assert not train & test


def test_canvas_is_the_digits_pasted_in_their_cells():
    images, targets = data._digits()
    for s in SAMPLES[:10]:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        canvas = np.zeros((64, 64), dtype=np.float32)
        for r in range(3):
            for c in range(3):
                x, y = s.offsets[r, c]
                assert dense.CELL_EDGES[c] <= x and x + 16 <= dense.CELL_EDGES[c + 1]
                assert dense.CELL_EDGES[r] <= y and y + 16 <= dense.CELL_EDGES[r + 1]
                canvas[y : y + 16, x : x + 16] = np.kron(images[s.sources[r, c]], np.ones((2, 2)))
                assert s.digits[r, c] == targets[s.sources[r, c]]
        assert np.array_equal(s.image[:, :, 0], np.round(canvas * 255 / 16).astype(np.uint8))


def test_every_kind_answers_correctly():
    for i in range(12):
        canvas = dense.make_sample("test", i, seed=5)
        for kind in dense.KINDS:
            s = dense.make_sample("test", i, seed=5, kind=kind)
            assert np.array_equal(s.image, canvas.image) and s.kind == kind
            words = s.question.split()
            if kind == "cell":
                row, col = int(words[words.index("row") + 1]), int(words[words.index("column") + 1])
                assert s.answer == str(s.digits[row - 1, col - 1])
                assert s.asked_cells == ((row - 1) * 3 + col - 1,)
            elif kind == "count":
                digit = int(words[2])
                assert s.answer == str(int((s.digits == digit).sum()))
                assert s.asked_cells == tuple(range(9))
            elif kind == "largest":
                row = int(words[words.index("row") + 1])
                assert s.answer == str(int(s.digits[row - 1].max()))
            else:
                row = int(words[words.index("row") + 1])
                assert s.answer.split() == [str(int(d)) for d in s.digits[row - 1]]
                assert s.asked_cells == tuple((row - 1) * 3 + c for c in range(3))


def test_kinds_are_all_drawn_and_counts_are_not_mostly_zero():
    kinds = [s.kind for s in dense.make_split("test", 400, seed=5)]
    assert set(kinds) == set(dense.KINDS) and min(kinds.count(k) for k in dense.KINDS) > 60
    counts = [int(s.answer) for s in dense.make_split("test", 400, seed=5) if s.kind == "count"]
    assert np.mean(np.array(counts) > 0) > 0.5


def test_masks_follow_the_ink():
    for s in SAMPLES[:10]:
        assert s.ink_mass.shape == (9, 8, 8) and s.ink_masks.shape == (9, 8, 8)
        total = s.image[:, :, 0].astype(np.float64).reshape(8, 8, 8, 8).sum(axis=(1, 3)) * 16 / 255
        assert np.allclose(total, s.ink_mass.sum(axis=0), atol=64 * 8 / 255)  # 8-bit rounding, 64 pixels
        assert np.array_equal(s.ink_masks, s.ink_mass >= data.INK_THRESHOLD)
        assert np.array_equal(s.background_mask, total == 0)
        assert not (s.background_mask & s.ink_mask).any()
        all_ink, asked, other = (set(s.ink_tokens(w).tolist()) for w in ("all", "asked", "other"))
        assert asked | other == all_ink and not asked & other
        labels = s.patch_labels()
        assert set(np.flatnonzero(labels == 10)) == set(s.background_tokens().tolist())
        for token in np.flatnonzero((labels >= 0) & (labels < 10)):
            cells = np.flatnonzero(s.ink_masks.reshape(9, 64)[:, token])
            assert {int(s.digits.reshape(-1)[c]) for c in cells} == {int(labels[token])}


def test_evidence_covers_more_than_half_of_the_tokens():
    ink = np.mean([len(s.ink_tokens("all")) for s in SAMPLES])
    assert ink >= 32, ink  # the point of the dense task: a 25% budget cannot keep all the evidence


def test_vocabulary_covers_every_question_and_answer():
    words = set(TASKS["dense"].words)
    for s in dense.make_split("test", 200, seed=5):
        assert set(s.question.split()) | set(s.answer.split()) <= words
        assert len(s.answer.split()) <= dense.MAX_ANSWER_TOKENS


def test_easy_task_shares_the_interface():
    s = data.make_sample("test", 0, seed=5)
    assert s.kind == "side"
    assert np.array_equal(s.ink_tokens("asked"), s.ink_tokens(s.side))
    assert np.array_equal(s.ink_tokens("all"), s.ink_tokens("both"))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("hard")


def test_wilson_interval_brackets_the_rate():
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
