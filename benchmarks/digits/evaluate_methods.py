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
import json
import math
import os
import time

import torch
from modeling_deft_llava.configuration.deft_settings import num_kept_tokens
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.compressors.compression_registry import BASELINE_METHODS

from .common import (
    NUM_VISUAL_TOKENS,
    TEST_SEED,
    DigitsCollator,
    accuracy_by_kind,
    answer_correct,
    answer_token_ids,
    atomic_write_json,
    evaluate_generate,
)
from .costs import prefill_costs
from .data import wilson_interval
from .tasks import TASKS

MODEL_METHODS = tuple(BASELINE_METHODS)  # every baseline, in the registry's order

DEFT_VARIANTS = ("deft", "deft_hybrid", "deft_adaptive")


def score(res: dict, samples, tokenizer, kinds=("side",)) -> dict:
    """Two exact-match views of the same greedy generations:
    `accuracy`: the first generated tokens are the answer's tokens (the task's answer; one digit for the easy
    task, one or three for the dense task); `strict_accuracy`: the decoded generation is exactly the answer
    (the answer followed by `</s>`, nothing more). Per question kind too (`by_kind`) when a task has several."""
    hits = [
        answer_correct(g, answer_token_ids(tokenizer, s.answer))
        for g, s in zip(res["generated_ids"], samples)
    ]
    correct = int(sum(hits))
    n = len(samples)
    out = {
        "accuracy": correct / n,
        "correct": correct,
        "n": n,
        "wilson95": list(wilson_interval(correct, n)),
        "strict_accuracy": res["accuracy"],
        "strict_correct": res["correct"],
        "strict_wilson95": res["wilson95"],
    }
    if len(kinds) > 1:
        out["by_kind"] = accuracy_by_kind(hits, [s.kind for s in samples], kinds)
    return out


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


def evaluate_model(
    model, processor, samples, task, batch_size: int, desc: str, cost_samples: int = 0
) -> dict:
    """Answer/strict accuracy (`score`) of a loaded model on `samples` of `task` (greedy `generate`), plus its
    prefill cost on the first `cost_samples` of them when asked (`prefill_costs`)."""
    res = evaluate_generate(
        model, processor, samples, batch_size, desc=desc, max_new_tokens=task.max_answer_tokens + 1
    )
    out = score(res, samples, processor.tokenizer, task.kinds)
    if cost_samples:
        batch = DigitsCollator(processor, train=False)(samples[:cost_samples])
        out.update(prefill_costs(model, batch))
    return out


def evaluate_config(folder: str, settings: dict, samples, task, batch_size: int = 125) -> dict:
    """Answer/strict accuracy (`score`) and visual tokens seen of one configuration (`settings`: config and
    processor overrides, e.g. `method_settings(...)` plus DeFT settings) on `samples` of `task`."""
    model, processor = load(folder, settings)
    desc = ",".join(f"{k}={v}" for k, v in settings.items() if k != "use_deft")
    out = evaluate_model(model, processor, samples, task, batch_size, desc)
    config = model.config  # the folder's own settings, with `settings` applied (not `settings` alone)
    k = config.num_kept_tokens(NUM_VISUAL_TOKENS) if config.use_deft else NUM_VISUAL_TOKENS
    out["mean_visual_tokens"] = mean_visual_tokens(model, processor, samples, batch_size, k)
    return out


def spread_by_ratio(rows: list[dict], ratios: list[float]) -> dict:
    """Per budget: the best and the worst method (every row label, positions included) by answer accuracy,
    the gap in points, and whether their 95% Wilson intervals are disjoint."""
    out = {}
    for ratio in ratios:
        measured = [r for r in rows if r["retention_ratio"] == ratio and r.get("accuracy") is not None]
        if len(measured) < 2:
            continue
        best = max(measured, key=lambda r: r["accuracy"])
        worst = min(measured, key=lambda r: r["accuracy"])
        out[str(ratio)] = {
            "best": {k: best[k] for k in ("method", "accuracy", "wilson95")},
            "worst": {k: worst[k] for k in ("method", "accuracy", "wilson95")},
            "spread_points": 100 * (best["accuracy"] - worst["accuracy"]),
            "wilson_intervals_disjoint": worst["wilson95"][1] < best["wilson95"][0],
        }
    return out


def merge_update(previous: dict, update: dict) -> dict:
    """`previous` with the rows of `update`'s methods replaced (each label keeps its place in the method list,
    new labels go last) and the update's command recorded under `updates`.

    Raises:
        ValueError: the all-token accuracy of the two runs differs (not the same model or data).
    """
    if previous["full"]["accuracy"] != update["full"]["accuracy"]:
        raise ValueError(
            f"--update: the all-token accuracy is {update['full']['accuracy']!r} now but "
            f"{previous['full']['accuracy']!r} in the results file: not the same model or data"
        )
    labels = set(update["methods"])
    merged = dict(previous)
    merged["methods"] = previous["methods"] + [m for m in update["methods"] if m not in previous["methods"]]
    rows = [r for r in previous["rows"] if r["method"] not in labels] + update["rows"]
    order = {label: i for i, label in enumerate(merged["methods"])}
    merged["rows"] = sorted(rows, key=lambda r: order[r["method"]])  # stable: ratios keep their order
    merged["updates"] = previous.get("updates", []) + [
        {"command": update["command"], "methods": update["methods"], "date": time.strftime("%Y-%m-%d")}
    ]
    if "full_deft_checkpoint" in update:
        merged["full_deft_checkpoint"] = update["full_deft_checkpoint"]
    return merged


TITLES = {
    "easy": "Two-digit VQA on real handwritten digits",
    "dense": "Dense 3x3-digit VQA on real handwritten digits",
}


def plot(results: dict, path: str) -> None:
    """Accuracy against the visual tokens the language model saw; with measured costs, also against prefill
    FLOPs (share of the all-token model's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = results["full"]
    with_costs = "prefill_flops" in full
    fig, axes = plt.subplots(1, 2 if with_costs else 1, figsize=(13 if with_costs else 7, 4.8), squeeze=False)
    views = [("visual tokens the language model saw (share of 64)", _seen_share)]
    if with_costs:
        views.append(
            ("prefill FLOPs (share of all 64 tokens)", lambda r: r["prefill_flops"] / full["prefill_flops"])
        )
    for ax, (xlabel, x_of) in zip(axes[0], views):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for method in results["methods"]:
            rows = sorted(
                (x_of(r), r["accuracy"])
                for r in results["rows"]
                if r["method"] == method and r.get("accuracy") is not None
            )
            if rows:
                style = "--" if "renumbered" in method else "-"
                ax.plot([r[0] for r in rows], [r[1] for r in rows], style, marker="o", ms=3, label=method)
        ax.axhline(
            full["accuracy"], color="k", linestyle="--", label=f"all 64 tokens ({full['accuracy']:.1%})"
        )
        if results.get("task", "easy") == "easy":
            ax.axhline(0.1, color="grey", linestyle=":", label="chance (10%)")
        ax.set(xlabel=xlabel, ylabel="held-out answer accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle(TITLES[results.get("task", "easy")])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _seen_share(row: dict) -> float:
    seen = row.get("mean_visual_tokens_per_lm_layer", row["mean_visual_tokens"])
    return seen / NUM_VISUAL_TOKENS


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="easy")
    parser.add_argument("--base", default=None, help="all-token model folder (default: the task's)")
    parser.add_argument("--deft", default=None, help="folder with trained DeFT modules (default: the task's)")
    parser.add_argument("--methods", default=",".join(DEFT_VARIANTS + MODEL_METHODS))
    parser.add_argument(
        "--ratios", default=None, help="default: 0.5,0.482,0.25,0.125 (easy), 0.5,0.25,0.125,0.0625 (dense)"
    )
    parser.add_argument("--n", type=int, default=1000, help="held-out queries")
    parser.add_argument(
        "--positions",
        default="original",
        help="comma-separated: original (kept tokens keep their position ids) and/or renumbered (0..L-1)",
    )
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--out", default=None, help="default: the task's results JSON (tasks.py)")
    parser.add_argument(
        "--cost-samples",
        type=int,
        default=0,
        help="measure prefill FLOPs, layer lengths and time on this many queries per row (0: off)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-run only --methods and replace their rows in the existing --out file (same task, n, base and "
        "ratios required; the all-token accuracy is re-measured and must match; the command is recorded)",
    )
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.base, args.deft = args.base or task.checkpoint, args.deft or task.deft_checkpoint
    args.out = args.out or task.results
    if args.ratios is None:
        args.ratios = "0.5,0.482,0.25,0.125" if args.task == "easy" else "0.5,0.25,0.125,0.0625"

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

    previous = None
    if args.update:
        if not os.path.isfile(args.out):
            parser.error(f"--update needs an existing results file, {args.out!r} does not exist")
        with open(args.out) as f:
            previous = json.load(f)
        for key, value in (("task", args.task), ("n", args.n), ("base", args.base), ("test_seed", TEST_SEED)):
            if previous.get(key) != value:
                parser.error(f"--update: {args.out!r} has {key}={previous.get(key)!r}, this run {value!r}")
        earlier_ratios = sorted({r["retention_ratio"] for r in previous["rows"]})
        if sorted(ratios) != earlier_ratios:
            parser.error(f"--update: {args.out!r} has ratios {earlier_ratios}, this run {sorted(ratios)}")

    samples = task.make_split("test", args.n, seed=TEST_SEED)
    torch.set_grad_enabled(False)
    start = time.time()

    def run(model, processor, desc: str) -> dict:
        """Accuracy of one configuration, plus its prefill cost when asked (`--cost-samples`)."""
        return evaluate_model(model, processor, samples, task, args.batch_size, desc, args.cost_samples)

    model, processor = load(args.base, method_settings("full", 1.0))
    full = run(model, processor, "full")
    full_acc = full["accuracy"]
    results = {
        "task": args.task,
        "command": "python -m benchmarks.digits.evaluate_methods "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "base": args.base,
        "deft_checkpoint": args.deft,
        "n": args.n,
        "test_seed": TEST_SEED,
        "visual_tokens_full": NUM_VISUAL_TOKENS,
        "metric": score.__doc__,
        "costs": prefill_costs.__doc__ if args.cost_samples else None,
        "cost_samples": args.cost_samples,
        "torch_threads": torch.get_num_threads(),
        "full": full,
        "methods": [],  # row labels, filled below
        "rows": [],
    }
    if any(m in DEFT_VARIANTS for m in methods):  # the DeFT checkpoint must hold the same backbone
        model, processor = load(args.deft, method_settings("full", 1.0))
        results["full_deft_checkpoint"] = run(model, processor, "full (deft ckpt)")
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
            res = run(model, processor, f"{label}@{ratio}")
            row.update(res, share_of_full=res["accuracy"] / reference["accuracy"])
            row["mean_visual_tokens"] = mean_visual_tokens(model, processor, samples, args.batch_size, k)
            results["rows"].append(row)
            print(
                f"{label:14} ratio {ratio:5.3f} K={k:2d}: {res['accuracy']:.1%} ({row['share_of_full']:.1%} of full;"
                f" strict {res['strict_accuracy']:.1%}; {row['mean_visual_tokens']:.1f} visual tokens seen)"
            )
    if previous is not None:
        results = merge_update(previous, results)
    results["spread"] = spread_by_ratio(results["rows"], ratios)
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
