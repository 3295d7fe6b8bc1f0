"""The two digits tasks behind one `--task` flag: what each script needs to know about a task.

* ``easy`` (`data.py`): two digits, "what digit is on the left ?"; ink covers ~17% of the visual tokens.
* ``video`` (`video.py`): 4 easy-task frames (256 visual tokens behind one `<video>`), questions about a frame,
  counts over time and order; a `DeftLlavaForConditionalGeneration` warm-started from the easy checkpoint.
* ``dense`` (`dense.py`): a 3x3 grid of digits, four question kinds, answers of one or three tokens; ink covers
  ~72% of the visual tokens, so budgets of 25% and 12.5% must choose among evidence tokens.

Both tasks share the canvas (64x64, 64 visual tokens), the model recipe (`common.build_model`) and the training
and evaluation scripts; they differ in samples, vocabulary and where their outputs live.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from . import data, dense, video

HERE = os.path.dirname(os.path.abspath(__file__))
WORK_DIR = os.path.join(HERE, "_work")  # git-ignored intermediates


@dataclass(frozen=True)
class DigitsTask:
    """One task: its sample generator, vocabulary and default output locations (relative to the repo root)."""

    name: str
    make_split: Callable  # (split, num_samples, seed) -> a lazy sequence of samples
    words: tuple[str, ...]  # every word of prompts and answers (the word-level tokenizer's vocabulary)
    max_answer_tokens: int  # answer tokens before `</s>`
    kinds: tuple[str, ...]  # question kinds (samples carry `.kind`)
    checkpoint: str  # the all-token LLaVA
    deft_checkpoint: str  # the same backbone with trained DeFT modules
    stage1: str  # the stage-1 vision tower (git-ignored)
    validity: str  # validity.py's JSON
    results: str  # evaluate_methods' JSON (the plot sits next to it)
    modality: str = "image"  # "video": samples carry `frames`, one `<video>` per prompt (`video.py`)

    def work(self, name: str) -> str:
        """A git-ignored working folder of this task (`_work/<name>` for easy, `_work/<task>_<name>` else)."""
        return os.path.join(WORK_DIR, name if self.name == "easy" else f"{self.name}_{name}")


TASKS = {
    "easy": DigitsTask(
        name="easy",
        make_split=data.make_split,
        words=tuple(data.WORDS),
        max_answer_tokens=1,
        kinds=("side",),
        checkpoint="checkpoints/digits-llava-base",
        deft_checkpoint="checkpoints/digits-deft-llava",
        stage1=os.path.relpath(os.path.join(WORK_DIR, "vision_stage1.safetensors")),
        validity="benchmarks/digits/validity.json",
        results="benchmarks/results/digits_accuracy.json",
    ),
    "dense": DigitsTask(
        name="dense",
        make_split=dense.make_split,
        words=tuple(dense.WORDS),
        max_answer_tokens=dense.MAX_ANSWER_TOKENS,
        kinds=dense.KINDS,
        checkpoint="checkpoints/digits-dense-llava-base",
        deft_checkpoint="checkpoints/digits-dense-deft-llava",
        stage1=os.path.relpath(os.path.join(WORK_DIR, "vision_stage1_dense.safetensors")),
        validity="benchmarks/digits/validity_dense.json",
        results="benchmarks/results/digits_dense_accuracy.json",
    ),
    "video": DigitsTask(
        name="video",
        make_split=video.make_split,
        words=tuple(video.WORDS),
        max_answer_tokens=video.MAX_ANSWER_TOKENS,
        kinds=video.KINDS,
        checkpoint="checkpoints/digits-video-llava-base",
        deft_checkpoint="checkpoints/digits-video-deft-llava",
        stage1="checkpoints/digits-llava-base",  # warm start: the easy task's whole model (its tower reads frames)
        validity="benchmarks/digits/validity_video.json",
        results="benchmarks/results/digits_video_accuracy.json",
        modality="video",
    ),
}


def get_task(name: str) -> DigitsTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
    return TASKS[name]
