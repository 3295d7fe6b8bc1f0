"""Shared pieces of the digits benchmark: processor, model recipe, collator, evaluation."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import torch
from modeling_deft_llava.processing.word_tokenizer import build_word_tokenizer
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from .data import CANVAS, PATCH, WORDS, chat_messages, wilson_interval
from .video import chat_messages as video_chat_messages

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CHECKPOINT_DIR = os.path.join(REPO, "checkpoints", "digits-llava-base")
WORK_DIR = os.path.join(HERE, "_work")  # git-ignored intermediates (stage-1 vision tower)
STAGE1_PATH = os.path.join(WORK_DIR, "vision_stage1.safetensors")

VISION_FEATURE_LAYER = -1  # the last of the 3 CLIP layers (the one stage 1 supervises)
SELECT_STRATEGY = "default"  # drop CLS -> 64 visual tokens
NUM_VISUAL_TOKENS = (CANVAS // PATCH) ** 2
# canvases are mostly 0 with white ink; rough dataset statistics (pixel mean ~0.12, std ~0.3)
IMAGE_MEAN = [0.1, 0.1, 0.1]
IMAGE_STD = [0.3, 0.3, 0.3]
TEST_SEED = 1234  # the held-out query set of the benchmark


def is_video(sample) -> bool:
    """A video task's sample (`video.VideoSample`: frames) rather than an image task's (one canvas)."""
    return hasattr(sample, "frames")


def build_processor(words=WORDS) -> LlavaProcessor:
    """The processor of a digits task; `words` is its vocabulary (`tasks.DigitsTask.words`; easy by default)."""
    tokenizer = build_word_tokenizer(list(words))
    # the PIL backend by name: the shipped checkpoints were preprocessed by it, and naming `CLIPImageProcessor`
    # without torchvision prints transformers' fallback notice on every run
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": CANVAS},
        do_center_crop=True,
        crop_size={"height": CANVAS, "width": CANVAS},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy=SELECT_STRATEGY,
        chat_template=tokenizer.chat_template,
        # CLIP prepends a CLS token; "default" drops it again: 64 + 1 - 1 = 64 placeholders per image
        num_additional_image_tokens=1,
    )


# RoPE base of the tiny decoder. With head_dim 32, RoPE pair i turns by rope_theta ** (-i / 16) rad per
# position; rope_theta = (8 / (2 * pi)) ** 16 ~= 47.7 makes pair 1 turn by exactly 2 * pi / 8 per position, so
# one rotary pair has the period of an 8-patch image row and a token's column (left or right half) is a plain
# phase difference. With the Llama default (10000) no pair has that period.
ROPE_THETA = (8 / (2 * math.pi)) ** 16


def build_video_processor(words, **deft):
    """The video task's processor: a `DeftLlavaProcessor` (stock LLaVA has no `<video>`) with the digits image
    processor and the word tokenizer of `words`; `deft`: DeFT settings (`use_deft`, `deft_retention_ratio`...)."""
    from modeling_deft_llava import DeftLlavaProcessor

    stock = build_processor(words)
    return DeftLlavaProcessor(
        image_processor=stock.image_processor,
        tokenizer=stock.tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy=SELECT_STRATEGY,
        chat_template=stock.tokenizer.chat_template,
        num_additional_image_tokens=1,
        **deft,
    )


def video_model_from_image_checkpoint(folder: str, processor, max_positions: int = 1024):
    """A `DeftLlavaForConditionalGeneration` (compression off) warm-started from an image digits checkpoint
    (`folder`, stock LLaVA): same weights, the vocabulary grown to `processor`'s tokenizer (the image task's
    words keep their ids; new rows start at the mean embedding, transformers' default), `<video>` as the video
    placeholder and room for `max_positions` positions (a video is frames x 64 tokens)."""
    from modeling_deft_llava import DeftLlavaForConditionalGeneration

    model = DeftLlavaForConditionalGeneration.from_pretrained(folder, use_deft=False)
    tok = processor.tokenizer
    old = build_processor().tokenizer.get_vocab()
    new = tok.get_vocab()
    if any(new.get(word) != i for word, i in old.items()):
        raise ValueError("the video vocabulary must start with the image task's tokens, in their order")
    model.resize_token_embeddings(len(tok))
    model.config.video_token_index = tok.convert_tokens_to_ids("<video>")
    model.config.text_config.max_position_embeddings = max_positions
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return model


def build_config(
    processor: LlavaProcessor, rope_theta: float = ROPE_THETA, text_heads: int = 4
) -> LlavaConfig:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=CANVAS,
        patch_size=PATCH,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=128,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=SELECT_STRATEGY,
        vision_feature_layer=VISION_FEATURE_LAYER,
        image_seq_length=NUM_VISUAL_TOKENS,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def build_model(
    processor: LlavaProcessor, seed: int, rope_theta: float = ROPE_THETA, text_heads: int = 4
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(processor, rope_theta, text_heads))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model


def pixel_values(processor: LlavaProcessor, samples) -> torch.Tensor:
    out = processor.image_processor([s.image for s in samples], return_tensors="pt")
    return out["pixel_values"]


class DigitsCollator:
    """Processor batch with labels on the answer token and `</s>` only (prompt, padding and image
    placeholders are -100). With `train=False` the prompt ends at `ASSISTANT:` (generation prompt)."""

    def __init__(self, processor: LlavaProcessor, train: bool = True):
        self.processor = processor
        self.train = train
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self.video_id = tok.convert_tokens_to_ids("<video>")

    def __call__(self, samples):
        proc = self.processor
        video = is_video(samples[0])
        messages = video_chat_messages if video else chat_messages
        visual = {"videos": [s.frames for s in samples]} if video else {"images": [s.image for s in samples]}
        prompts = [
            proc.apply_chat_template(messages(s.question), add_generation_prompt=True) for s in samples
        ]
        if not self.train:
            return proc(**visual, text=prompts, padding=True, return_tensors="pt")
        texts = [
            proc.apply_chat_template(messages(s.question, s.answer), add_generation_prompt=False)
            for s in samples
        ]
        batch = proc(**visual, text=texts, padding=True, return_tensors="pt")
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            assert text.startswith(prompt), (prompt, text)
            n_answer = len(proc.tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"])
            # left padding: the answer tokens are the last n_answer tokens of the row
            labels[i, -n_answer:] = ids[i, -n_answer:]
        labels[(ids == self.pad_id) | (ids == self.image_id) | (ids == self.video_id)] = -100
        batch["labels"] = labels
        return batch


@torch.no_grad()
def evaluate_generate(
    model, processor, samples, batch_size: int = 100, desc: str = "eval", max_new_tokens: int = 2
) -> dict:
    """Greedy `generate` exact-match accuracy (decoded answer, special tokens skipped, stripped).
    `max_new_tokens`: the task's answer tokens + 1 (room for `</s>`); 2 for the easy task's one-digit answers.
    Also returns every generated token id (`generated_ids`, one list per sample)."""
    model.eval()
    collate = DigitsCollator(processor, train=False)
    correct = 0
    preds, first_ids, generated = [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc):
        chunk = samples[start : start + batch_size]
        batch = collate(chunk)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        first_ids.extend(new[:, 0].tolist())
        generated.extend(new.tolist())
        for s, t in zip(chunk, texts):
            preds.append(t.strip())
            correct += int(t.strip() == s.answer)
    n = len(samples)
    lo, hi = wilson_interval(correct, n)
    return {
        "accuracy": correct / n,
        "correct": correct,
        "n": n,
        "wilson95": [lo, hi],
        "predictions": preds,
        "first_token_ids": first_ids,
        "generated_ids": generated,
    }


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """The answer's token ids, without special tokens (`"4 0 7"` -> three ids)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def answer_correct(generated: list[int], answer: list[int]) -> bool:
    """Answer accuracy: the first generated tokens are the answer's tokens (what follows is not checked)."""
    return list(generated[: len(answer)]) == list(answer)


def accuracy_by_kind(hits: list[bool], kinds: list[str], all_kinds) -> dict:
    """Accuracy, count and Wilson interval per question kind."""
    out = {}
    for kind in all_kinds:
        row = [h for h, k in zip(hits, kinds) if k == kind]
        c = int(sum(row))
        out[kind] = {"accuracy": c / max(len(row), 1), "correct": c, "n": len(row)}
        out[kind]["wilson95"] = list(wilson_interval(c, len(row)))
    return out


def atomic_write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
