"""CPU time of one training step of a digits-sized LLaVA-NeXT (AnyRes) model, next to the same model as LLaVA-1.5.

What training a small AnyRes model on a high-resolution digits canvas would cost here (`docs/llava_next.md`,
"High-resolution accuracy"): the shipped digits model (`checkpoints/digits-llava-base`: CLIP 64x64 / patch 8,
hidden 128, 3+3 layers, vocab 27) made AnyRes with the pinpoints `--pinpoints` (default 128x128: a 64x64 base
view plus 2x2 tiles, 64 + 16x(16+1) = 336 visual tokens), trained on a batch of `--batch-size` 128x128
canvases with a short question and a one-token answer (random pixels and tokens: the time does not depend on
them), full fine-tuning with AdamW. The LLaVA-1.5 row is the same model on the 64x64 canvas (64 tokens), the
step the digits benchmark's stage 2 takes (`benchmarks/digits/README.md`: 3,000 steps, batch 32).

    .venv/bin/python benchmarks/anyres_step_time.py [--steps 3] [--batch-size 32] [--threads 1]

Prints one JSON line per model: visual tokens, sequence length, median seconds per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "checkpoints" / "digits-llava-base" / "config.json"
QUESTION_TOKENS = 8  # "what digit is on the left ?" and the template, about this long


def fields() -> dict:
    values = json.loads(BASE.read_text())
    keep = (
        "vision_config",
        "text_config",
        "image_token_index",
        "vision_feature_layer",
        "projector_hidden_act",
    )
    out = {k: values[k] for k in keep}
    out["vision_feature_select_strategy"] = "default"
    return out


def step_time(model, inputs: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, optimizer state)
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def text(batch: int, visual: int, image_token: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, QUESTION_TOKENS + visual + 2), generator=generator)
    ids[:, QUESTION_TOKENS : QUESTION_TOKENS + visual] = image_token
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # the answer digit
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--pinpoints", default="128x128", help="comma-separated HxW canvases, e.g. 128x128,64x128"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = fields()
    view = base["vision_config"]["image_size"]
    side = view // base["vision_config"]["patch_size"]
    vocab = base["text_config"]["vocab_size"]
    image_token = base["image_token_index"]
    rows = []

    llava = LlavaForConditionalGeneration(LlavaConfig(**base, image_seq_length=side * side))
    inputs = text(args.batch_size, side * side, image_token, vocab)
    inputs["pixel_values"] = torch.randn(args.batch_size, 3, view, view)
    rows.append(("llava-1.5 64x64", side * side, inputs, llava))

    pinpoints = [[int(v) for v in p.split("x")] for p in args.pinpoints.split(",")]
    height, width = pinpoints[-1]
    next_model = LlavaNextForConditionalGeneration(
        LlavaNextConfig(**base, image_grid_pinpoints=pinpoints, image_seq_length=side * side)
    )
    tiles = (height // view) * (width // view)
    grid_rows, grid_cols = side * height // view, side * width // view
    visual = side * side + grid_rows * (grid_cols + 1)  # base view + grid with one row marker per row
    inputs = text(args.batch_size, visual, image_token, vocab)
    inputs["pixel_values"] = torch.randn(args.batch_size, 1 + tiles, 3, view, view)
    inputs["image_sizes"] = torch.tensor([[height, width]] * args.batch_size)
    rows.append((f"llava-next {height}x{width}", visual, inputs, next_model))

    for name, tokens, batch, model in rows:
        seconds = step_time(model, batch, args.steps)
        record = {
            "model": name,
            "visual_tokens": tokens,
            "sequence": batch["input_ids"].shape[1],
            "batch_size": args.batch_size,
            "threads": args.threads,
            "seconds_per_step": round(seconds, 3),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
