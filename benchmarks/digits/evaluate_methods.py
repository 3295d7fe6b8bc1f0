"""Held-out accuracy of every compression method at several budgets, on the real-digits VQA benchmark.

    python -m benchmarks.digits.evaluate_methods \
        --base checkpoints/digits-llava-base --deft checkpoints/digits-deft-llava \
        --out benchmarks/results/digits_accuracy.json

Each (method, budget) loads the checkpoint into `DeftLlavaForConditionalGeneration` with that method's
config and a `DeftLlavaProcessor` with the same settings, and answers the same held-out queries with greedy
`generate` (exact match). Baselines use the all-token base model; DeFT rows use the DeFT checkpoint (the same
base weights plus the trained DeFT modules). Accuracy comes with a 95% Wilson interval and as a share of the
full-token accuracy of the same weights. DeCo pools to a square grid, so it runs only where K is a perfect
square (16 of 64 = 25%); other DeCo budgets are reported as not applicable.
Writes the JSON atomically and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from modeling_deft_llava.configuration.deft_settings import num_kept_tokens

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.compressors.compression_registry import BASELINE_METHODS

from .common import NUM_VISUAL_TOKENS, TEST_SEED, DigitsCollator, atomic_write_json, evaluate_generate
from .data import make_split, wilson_interval

MODEL_METHODS = tuple(BASELINE_METHODS)  # every baseline, in the registry's order

DEFT_VARIANTS = ("deft", "deft_hybrid", "deft_adaptive")


def score(res: dict, samples, tokenizer) -> dict:
    """Two exact-match views of the same greedy generations:
    `accuracy`: the first generated token is the answer digit (the task's one-token answer);
    `strict_accuracy`: the decoded generation is exactly the digit (the digit followed by `</s>`)."""
    answers = tokenizer.convert_ids_to_tokens(res["first_token_ids"])
    correct = sum(a == s.answer for a, s in zip(answers, samples))
    n = len(samples)
    return {
        "accuracy": correct / n,
        "correct": correct,
        "n": n,
        "wilson95": list(wilson_interval(correct, n)),
        "strict_accuracy": res["accuracy"],
        "strict_correct": res["correct"],
    }


def method_settings(method: str, ratio: float, positions: str = "original") -> dict:
    """Config/processor overrides for one row of the benchmark (`positions`: "original" keeps the kept tokens'
    original position ids, the project's default; "renumbered" numbers them 0..L-1, as the official LLaVA
    integrations of VisionZip, DivPrune, FiCoCo-V, Recoverable and DeCo do)."""
    settings = _method_settings(method, ratio)
    if positions == "renumbered" and settings.get("use_deft"):
        settings["deft_keep_original_positions"] = False
    return settings


def _method_settings(method: str, ratio: float) -> dict:
    if method == "full":
        return {"use_deft": False}
    if method in DEFT_VARIANTS:
        mode = {"deft": "fast", "deft_hybrid": "hybrid", "deft_adaptive": "adaptive"}[method]
        return {
            "use_deft": True,
            "deft_retention_ratio": ratio,
            "deft_inference_mode": mode,
            "compression_method": "deft",
        }
    settings = {"use_deft": True, "deft_retention_ratio": ratio, "compression_method": method}
    if (
        method == "ficoco_v"
    ):  # the official code reduces after layer 11 of CLIP-L's 24; this tower has 3 layers
        settings["compression_settings"] = {"start_layer": 1}
    return settings


def mean_visual_tokens(model, processor, samples, batch_size: int, k: int) -> float:
    """Visual tokens the language model really saw per image: K, plus RTD reconstructions (hybrid/adaptive)."""
    if model.config.compression_method != "deft" or model.config.deft_inference_mode == "fast":
        return float(k)
    collate = DigitsCollator(processor, train=False)
    total = 0
    for start in range(0, len(samples), batch_size):
        out = model(**collate(samples[start : start + batch_size]))
        total += (
            k * len(out.kept_indices) + int(out.num_reconstructed.sum())
            if out.num_reconstructed is not None
            else k * len(out.kept_indices)
        )
    return total / len(samples)


def load(folder: str, settings: dict):
    model = DeftLlavaForConditionalGeneration.from_pretrained(folder, **settings).eval()
    processor_keys = ("use_deft", "deft_retention_ratio", "deft_inference_mode", "compression_method")
    processor = DeftLlavaProcessor.from_pretrained(
        folder, **{k: v for k, v in settings.items() if k in processor_keys}
    )
    return model, processor


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = results["full"]["accuracy"]
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for method in results["methods"]:
        rows = sorted(
            (r["mean_visual_tokens"] / NUM_VISUAL_TOKENS, r["accuracy"])
            for r in results["rows"]
            if r["method"] == method and r.get("accuracy") is not None
        )
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=method)
    ax.axhline(full, color="k", linestyle="--", label=f"all 64 tokens ({full:.1%})")
    ax.axhline(0.1, color="grey", linestyle=":", label="chance (10%)")
    ax.set(
        xlabel="visual tokens the language model saw (share of 64)",
        ylabel="held-out exact match",
        title="Two-digit VQA on real handwritten digits",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="checkpoints/digits-llava-base", help="all-token model folder")
    parser.add_argument(
        "--deft", default="checkpoints/digits-deft-llava", help="folder with trained DeFT modules"
    )
    parser.add_argument("--methods", default=",".join(DEFT_VARIANTS + MODEL_METHODS))
    parser.add_argument("--ratios", default="0.5,0.482,0.25,0.125")
    parser.add_argument("--n", type=int, default=1000, help="held-out queries")
    parser.add_argument(
        "--positions",
        default="original",
        help="comma-separated: original (kept tokens keep their position ids) and/or renumbered (0..L-1)",
    )
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--out", default="benchmarks/results/digits_accuracy.json")
    args = parser.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in DEFT_VARIANTS + MODEL_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {list(DEFT_VARIANTS + MODEL_METHODS)}")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        parser.error(f"every ratio must be in (0, 1], got {bad}")
    for folder, needed in ((args.base, True), (args.deft, any(m in DEFT_VARIANTS for m in methods))):
        if needed and not os.path.isfile(os.path.join(folder, "config.json")):
            parser.error(f"checkpoint folder {folder!r} has no config.json (see benchmarks/digits/README.md)")
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    position_modes = [p for p in args.positions.split(",") if p]
    if not position_modes or any(p not in ("original", "renumbered") for p in position_modes):
        parser.error(f"--positions must list original and/or renumbered, got {args.positions!r}")

    samples = make_split("test", args.n, seed=TEST_SEED)
    torch.set_grad_enabled(False)
    start = time.time()
    model, processor = load(args.base, method_settings("full", 1.0))
    full = score(
        evaluate_generate(model, processor, samples, args.batch_size, desc="full"),
        samples,
        processor.tokenizer,
    )
    full_acc = full["accuracy"]
    results = {
        "command": "python -m benchmarks.digits.evaluate_methods "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "base": args.base,
        "deft_checkpoint": args.deft,
        "n": args.n,
        "test_seed": TEST_SEED,
        "visual_tokens_full": NUM_VISUAL_TOKENS,
        "metric": score.__doc__,
        "full": full,
        "methods": [],  # row labels, filled below
        "rows": [],
    }
    if any(m in DEFT_VARIANTS for m in methods):  # the DeFT checkpoint must hold the same backbone
        model, processor = load(args.deft, method_settings("full", 1.0))
        same = evaluate_generate(model, processor, samples, args.batch_size, desc="full (deft ckpt)")
        results["full_deft_checkpoint"] = score(same, samples, processor.tokenizer)
    for method, positions in [(m, p) for p in position_modes for m in methods]:
        label = method if positions == "original" else f"{method} (renumbered)"
        if label not in results["methods"]:
            results["methods"].append(label)
        for ratio in ratios:
            k = num_kept_tokens(NUM_VISUAL_TOKENS, ratio)
            row = {
                "method": label,
                "positions": positions,
                "retention_ratio": ratio,
                "kept_tokens": k,
                "kept_share": k / NUM_VISUAL_TOKENS,
            }
            if method == "deco" and math.isqrt(k) ** 2 != k:
                row["accuracy"] = None
                row["note"] = f"not applicable: DeCo pools to a square grid and K={k} is not a perfect square"
                results["rows"].append(row)
                continue
            folder = args.deft if method in DEFT_VARIANTS else args.base
            try:
                model, processor = load(folder, method_settings(method, ratio, positions))
            except ValueError as err:  # the method's config-time check (e.g. a layer this model lacks)
                row["accuracy"] = None
                row["note"] = f"not applicable: {err}"
                results["rows"].append(row)
                print(f"{method:14} ratio {ratio:5.3f}: not applicable ({err})")
                continue
            reference = (
                results.get("full_deft_checkpoint", results["full"])
                if method in DEFT_VARIANTS
                else results["full"]
            )
            res = score(
                evaluate_generate(model, processor, samples, args.batch_size, desc=f"{label}@{ratio}"),
                samples,
                processor.tokenizer,
            )
            row.update(res, share_of_full=res["accuracy"] / reference["accuracy"])
            row["mean_visual_tokens"] = mean_visual_tokens(model, processor, samples, args.batch_size, k)
            results["rows"].append(row)
            print(
                f"{label:14} ratio {ratio:5.3f} K={k:2d}: {res['accuracy']:.1%} ({row['share_of_full']:.1%} of full;"
                f" strict {res['strict_accuracy']:.1%}; {row['mean_visual_tokens']:.1f} visual tokens seen)"
            )
    results["wall_time_s"] = time.time() - start
    atomic_write_json(args.out, results)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"full-token accuracy {full_acc:.1%}; wrote {args.out}")


def replot(path: str) -> None:
    """Redraw the PNG of an existing results file."""
    import json

    with open(path) as f:
        plot(json.load(f), os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    main()
