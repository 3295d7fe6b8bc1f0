"""The video digits task (benchmarks/digits/video.py) and its scripts: deterministic, answers right, masks right,
a batch the model takes, frame sampling, the warm start keeps the image vocabulary."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks.digits import data, video  # noqa: E402
from benchmarks.digits.common import (  # noqa: E402
    DigitsCollator,
    build_processor,
    build_video_processor,
)
from benchmarks.digits.evaluate_video import frame_sampling, oracle_keep  # noqa: E402
from benchmarks.digits.tasks import TASKS  # noqa: E402

SAMPLES = video.make_split("test", 60, seed=5)
F, T = video.FRAMES, video.TOKENS_PER_FRAME


def test_same_arguments_give_the_same_video():
    a, b = video.make_sample("test", 3, seed=5), SAMPLES[3]
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert (a.question, a.answer) == (b.question, b.answer)
    assert not np.array_equal(video.make_sample("test", 3, seed=6).frames[0], a.frames[0])


def test_splits_use_disjoint_source_images():
    train = {int(v) for s in video.make_split("train", 20, seed=5) for v in s.sources.ravel()}
    test = {int(v) for s in SAMPLES for v in s.sources.ravel()}
    assert train <= set(data.source_indices("train").tolist())
    assert test <= set(data.source_indices("test").tolist())
    assert not train & test


def test_frames_hold_their_digits_and_answers_are_right():
    images, targets = data._digits()
    for s in SAMPLES:
        assert len(s.frames) == F and all(f.shape == (64, 64, 3) for f in s.frames)
        assert np.array_equal(targets[s.sources], s.digits)
        for f in range(F):  # left digit's ink in the left half, right digit's in the right half
            assert not s.ink_masks[f, 0][:, 4:].any() and not s.ink_masks[f, 1][:, :4].any()
        if s.kind == "frame":
            ((f, side),) = s.asked
            assert s.answer == str(s.digits[f, side])
            assert f"frame {f + 1}" in s.question and data.SIDES[side] in s.question
        elif s.kind == "count":
            digit = int(s.question.split()[2])
            assert s.answer == str(int((s.digits == digit).sum()))
        else:
            a, b = (int(w) for w in s.question.split()[3::2])
            order = [int(d) for d in s.digits.reshape(-1)]
            assert int(s.answer) in (a, b) and order.index(int(s.answer)) == min(
                order.index(a), order.index(b)
            )


def test_vocabulary_covers_every_question_and_keeps_the_image_ids():
    words = set(TASKS["video"].words)
    for s in video.make_split("test", 200, seed=5):
        assert set(s.question.split()) | {s.answer} <= words
    image, vid = (
        build_processor().tokenizer.get_vocab(),
        build_video_processor(video.WORDS).tokenizer.get_vocab(),
    )
    assert all(vid[w] == i for w, i in image.items())


def test_token_masks_and_oracles():
    rng = np.random.default_rng(0)
    for s in SAMPLES[:20]:
        every, asked, other = (set(s.ink_tokens(w).tolist()) for w in ("all", "asked", "other"))
        assert asked <= every and other == every - asked and max(every) < F * T
        assert not every & set(s.background_tokens().tolist())
        assert len(oracle_keep(s, "oracle_background", rng)) == min(len(every), len(s.background_tokens()))
    with pytest.raises(ValueError, match="which must be one of"):
        SAMPLES[0].ink_tokens("left")


def test_frame_sampling_keeps_whole_evenly_spaced_frames():
    assert frame_sampling(4, 128).tolist() == list(range(64, 128)) + list(range(192, 256))  # frames 2 and 4
    assert frame_sampling(4, 64).tolist() == list(range(128, 192))  # frame 3
    assert frame_sampling(4, 32).tolist() == list(range(128, 160))  # below one frame: part of the middle one
    assert len(frame_sampling(8, 256)) == 256


def test_collator_builds_video_batches_with_answer_labels():
    processor = build_video_processor(video.WORDS, use_deft=True, deft_retention_ratio=0.25)
    batch = DigitsCollator(processor)(SAMPLES[:3])
    assert batch["pixel_values_videos"].shape == (3, F, 3, 64, 64)
    assert ((batch["input_ids"] == 5).sum(1) == F * T // 4).all()
    labelled = batch["labels"] != -100
    assert (labelled.sum(1) == 2).all()  # the answer token and </s>
    answers = [processor.tokenizer.convert_tokens_to_ids(s.answer) for s in SAMPLES[:3]]
    assert batch["labels"][labelled].view(3, 2)[:, 0].tolist() == answers
    prompt = DigitsCollator(processor, train=False)(SAMPLES[:1])
    assert "labels" not in prompt and torch.equal(
        prompt["pixel_values_videos"], batch["pixel_values_videos"][:1]
    )


def test_report_tables_come_from_the_results():
    from benchmarks.digits.evaluate_video import report

    row = dict(accuracy=0.5, wilson95=[0.4, 0.6], by_kind={k: {"accuracy": 0.5} for k in video.KINDS})
    results = {
        "visual_tokens_full": 256,
        "n": 10,
        "full": dict(row, prefill_s=0.3, prefill_batch=2, kv_cache_bytes_per_sample=2048),
        "methods": ["deft", "deco"],
        "rows": [
            dict(row, method="deft", retention_ratio=0.25, kept_tokens=64),
            dict(method="deco", retention_ratio=0.25, kept_tokens=64, accuracy=None),
        ],
        "oracles": {"oracle_background": dict(row, mean_visual_tokens=40.0)},
    }
    text = report(results)
    assert "| deft | 50.0% [40, 60] |" in text and "| deco | n/a |" in text
    assert "| full | 50.0% / 50.0% / 50.0% | 0.300 (2) | 2 KiB |" in text
    assert "| oracle_background | 50.0% |" in text
