"""Prefill time with compression off and on, and the DeFT scoring overhead as a share of prefill.

    python benchmarks/prefill_overhead.py [--ratio 0.25] [--batch 2] [--repeats 5] [--out results.json]

Random weights at a mid-size shape built here (cost does not depend on weight values; nothing is
downloaded): CLIP-like vision tower (hidden 512, 6 layers, 224 px, patch 14 -> 256 tokens) and a
Llama-like decoder (hidden 1024, 8 layers, vocab 32000). Timings are medians after one warm-up, on
whatever device runs it (CPU here). The ideal speedup is the ratio of language-model sequence lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from tqdm import tqdm

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration


def build(ratio: float | None, seed: int = 0) -> DeftLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = DeftLlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=6,
            num_attention_heads=8,
            image_size=224,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
        ),
        image_token_index=31999,
        vision_feature_layer=-2,
        use_deft=ratio is not None,
        deft_retention_ratio=ratio if ratio is not None else 0.482,
    )
    return DeftLlavaForConditionalGeneration(config).eval()


def inputs_for(model, batch: int, text_tokens: int = 64):
    n = model.config.num_kept_tokens(256)
    ids = torch.randint(10, 31000, (batch, text_tokens + n))
    ids[:, 8 : 8 + n] = model.config.image_token_index
    pixels = torch.randn(batch, 3, 224, 224)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")
    full, compressed = build(None), build(args.ratio)
    compressed.load_state_dict(full.state_dict(), strict=False)  # same backbone weights
    results = {"ratio": args.ratio, "batch": args.batch, "device": "cpu", "threads": torch.get_num_threads()}
    with torch.no_grad():
        timings = {}
        for name, model in tqdm([("full", full), ("deft", compressed)], desc="prefill"):
            inputs = inputs_for(model, args.batch)
            timings[name] = timed(lambda m=model, x=inputs: m(**x, use_cache=True), args.repeats)
            results[f"{name}_sequence_length"] = inputs["input_ids"].shape[1]
        deft = compressed.model.deft
        tokens = torch.randn(args.batch, 256, 1024)
        scoring = timed(lambda: deft(tokens=tokens, modality="image", spatial_shape=(16, 16)), args.repeats)
    results.update(
        prefill_full_s=timings["full"],
        prefill_deft_s=timings["deft"],
        speedup=timings["full"] / timings["deft"],
        ideal_speedup_lm_tokens=results["full_sequence_length"] / results["deft_sequence_length"],
        scoring_s=scoring,
        scoring_share_of_prefill=scoring / timings["deft"],
    )
    print(json.dumps(results, indent=2))
    if args.out:  # atomic: an interrupted run leaves no half-written file
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)) or ".")
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
