"""RTD calibration: why `hybrid` rebuilds every pruned token and `adaptive` never fires, and thresholds that work.

    python -m benchmarks.digits.calibrate_rtd --task dense --threads 1

For each budget:
1. On a calibration split drawn from the TRAIN split (`CALIBRATION_SEED`; never the test split), the statistics
   the RTD rule reads (`token_dictionary.uncertainty`: normalised entropy and max probability):
   - `hybrid`: each pruned visual token's own distribution, `features @ embed_tokens.weight.T` (what
     `method_deft.py` computes), over the tokens `fast` mode prunes at that budget;
   - `adaptive`: each sample's next-token distribution after the `fast` prefill (what `reconsider` reads).
   Their quantiles, the share the default thresholds flag, and whether they carry information: the AUROC of
   the token statistic for "holds ink of a digit the question asks about" (hybrid: a token worth rebuilding)
   and of the sample statistic for "the fast answer's first token is wrong" (adaptive: a sample worth a second
   prefill). 0.5 = no information.
2. Thresholds from `calibrate_thresholds` (the package's function) on those statistics, for a stated target
   share (`--target`, below).
3. On the test split (`TEST_SEED`, as `evaluate_methods`): `fast`, `hybrid` and `adaptive` with the calibrated
   thresholds, and `fast` at the budget that matches the visual tokens the calibrated modes see on average
   (the equal-token reference): accuracy, strict accuracy, visual tokens seen.

Target share (`--target extra-half-budget`, the default): reconstruct K/2 extra tokens on average, i.e. a
share K / (2 (N - K)) of the pruned tokens (hybrid) or of the samples (adaptive, which rebuilds all N - K pruned
tokens of a sample): 16.7% at 25% (K=16), 7.1% at 12.5% (K=8). Both modes then see about 1.5 K visual tokens,
so they are compared with `fast` at 1.5 K, the same count. A number in (0, 1) sets one share for both.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from modeling_deft_llava.configuration.deft_settings import DEFAULTS, num_kept_tokens
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava.deft.deft_module import pruned_token_mask
from modeling_deft_llava.deft.token_dictionary import calibrate_thresholds, uncertainty

from .common import NUM_VISUAL_TOKENS, TEST_SEED, DigitsCollator, answer_token_ids, atomic_write_json
from .evaluate_methods import evaluate_config, load, method_settings
from .report_tables import pct
from .tasks import TASKS

CALIBRATION_SEED = 2718  # calibration canvases: TRAIN split (disjoint source images from the test split)
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def auroc(scores, positives) -> float | None:
    """Area under the ROC curve of `scores` for `positives` (ties count one half); None if a class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    pos, neg = scores[positives], scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or values[end] != values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in QUANTILES},
    }


@torch.no_grad()
def rtd_statistics(model, processor, samples, batch_size: int) -> dict:
    """The RTD rule's statistics on `samples` for a `fast`-mode model (see the module docstring)."""
    inner = model.model
    embed = model.get_input_embeddings().weight  # (V, D)
    collate = DigitsCollator(processor, train=False)
    tok = {"entropy": [], "confidence": [], "asked_ink": [], "any_ink": []}
    smp = {"entropy": [], "confidence": [], "wrong": [], "kind": []}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collate(chunk)
        out = model(**batch, use_cache=False)
        # adaptive: the next-token distribution of the fast prefill
        last = out.logits[:, -1]  # (B, V)
        entropy, confidence = uncertainty(last)
        first = torch.tensor([answer_token_ids(processor.tokenizer, s.answer)[0] for s in chunk])
        smp["entropy"] += entropy.tolist()
        smp["confidence"] += confidence.tolist()
        smp["wrong"] += (last.argmax(-1) != first).tolist()
        smp["kind"] += [s.kind for s in chunk]
        # hybrid: each pruned token's own reading through the vocabulary embedding
        with inner.compression_disabled():
            features = inner.get_image_features(batch["pixel_values"])
        tokens = torch.stack(list(features.pooler_output))  # (B, N, D)
        entropy, confidence = uncertainty(tokens @ embed.t())  # (B, N)
        kept = torch.stack(list(out.kept_indices))  # (B, K)
        pruned = pruned_token_mask(kept, torch.ones_like(kept, dtype=torch.bool), tokens.shape[1])
        for i, s in enumerate(chunk):
            p = pruned[i]
            asked = torch.zeros(tokens.shape[1], dtype=torch.bool)
            asked[torch.as_tensor(s.ink_tokens("asked"))] = True
            anyink = torch.zeros_like(asked)
            anyink[torch.as_tensor(s.ink_tokens("all"))] = True
            tok["entropy"] += entropy[i][p].tolist()
            tok["confidence"] += confidence[i][p].tolist()
            tok["asked_ink"] += asked[p].tolist()
            tok["any_ink"] += anyink[p].tolist()
    return {"token": tok, "sample": smp}


def describe(stats: dict, entropy_threshold: float, confidence_threshold: float) -> dict:
    """Quantiles, the share flagged by the given thresholds, and the AUROCs (see the module docstring)."""
    out = {}
    for level, target in (("token", "asked_ink"), ("sample", "wrong")):
        s = stats[level]
        e, c = torch.tensor(s["entropy"]), torch.tensor(s["confidence"])
        flagged = (e > entropy_threshold) | (c < confidence_threshold)
        out[level] = {
            "entropy": summary(s["entropy"]),
            "confidence": summary(s["confidence"]),
            "share_flagged": float(flagged.float().mean()),
            "positive": target,
            "positive_share": float(np.mean(s[target])),
            # higher entropy / lower confidence should point at the positives
            "auroc_entropy": auroc(s["entropy"], s[target]),
            "auroc_low_confidence": auroc(-np.asarray(s["confidence"]), s[target]),
        }
        if level == "token":
            out[level]["auroc_entropy_any_ink"] = auroc(s["entropy"], s["any_ink"])
        else:  # per question kind: how often the rule fires, how often the fast answer is wrong
            kinds = np.asarray(s["kind"])
            out[level]["by_kind"] = {
                kind: {
                    "n": int((kinds == kind).sum()),
                    "share_flagged": float(flagged.numpy()[kinds == kind].mean()),
                    "share_wrong": float(np.asarray(s["wrong"])[kinds == kind].mean()),
                    "median_confidence": float(np.median(np.asarray(s["confidence"])[kinds == kind])),
                    "auroc_low_confidence": auroc(
                        -np.asarray(s["confidence"])[kinds == kind], np.asarray(s["wrong"])[kinds == kind]
                    ),
                }
                for kind in sorted(set(s["kind"]))
            }
    return out


def target_share(target: str, k: int, n: int) -> float:
    if target == "extra-half-budget":
        return k / (2 * (n - k))
    share = float(target)
    if not 0 < share < 1:
        raise ValueError(f"--target must be 'extra-half-budget' or a share in (0, 1), got {target!r}")
    return share


def report(results: dict) -> str:
    """The README tables: the statistics on the calibration split, then the test-split comparison."""
    lines = [
        "| budget | mode | statistic (calibration split) | median [5%, 95%] | flagged with defaults | AUROC | "
        "calibrated thresholds (entropy / confidence) | flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in results["budgets"]:
        for mode, level, what in (
            ("hybrid", "token", "pruned token: normalised entropy"),
            ("adaptive", "sample", "sample: next-token max probability"),
        ):
            d = b["default_thresholds"][level]
            stat = d["entropy"] if level == "token" else d["confidence"]
            q = stat["quantiles"]
            auc = (
                f"{d['auroc_entropy']:.2f} asked ink, {d['auroc_entropy_any_ink']:.2f} any ink"
                if level == "token"
                else f"{d['auroc_low_confidence']:.2f} wrong answer"
            )
            cal = b["calibrated"][mode]
            lines.append(
                f"| {b['retention_ratio']:.1%} | {mode} | {what} | {q['0.5']:.3f} [{q['0.05']:.3f}, {q['0.95']:.3f}] | "
                f"{d['share_flagged']:.1%} | {auc} | {cal['entropy_threshold']:.3f} / {cal['confidence_threshold']:.3f} | "
                f"{cal['share']:.1%} |"
            )
    lines += [
        "",
        "| budget | fast (K) | hybrid, calibrated | adaptive, calibrated | fast at the same token count |",
        "|---|---|---|---|---|",
    ]
    for b in results["budgets"]:
        t = b.get("test")
        if not t:
            continue

        def cell(row):
            return f"{pct(row)}, {row['mean_visual_tokens']:.1f} tokens"

        lines.append(
            f"| {b['retention_ratio']:.1%} | {cell(t['fast'])} | {cell(t['hybrid'])} | {cell(t['adaptive'])} | "
            f"{cell(t['fast_equal_tokens'])} |"
        )
    return "\n".join(lines)


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="dense")
    parser.add_argument("--deft", default=None, help="DeFT checkpoint (default: the task's)")
    parser.add_argument("--ratios", default="0.25,0.125")
    parser.add_argument("--calibration-n", type=int, default=1000, help="calibration queries (train split)")
    parser.add_argument("--n", type=int, default=1000, help="held-out test queries")
    parser.add_argument("--target", default="extra-half-budget")
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-eval", action="store_true", help="statistics and thresholds only")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--report", default=None, help="print the README tables of this results file and stop"
    )
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return
    task = TASKS[args.task]
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.deft or task.deft_checkpoint
    out_path = args.out or f"benchmarks/results/digits_{args.task}_rtd_calibration.json"
    ratios = [float(r) for r in args.ratios.split(",") if r]
    n_tokens = NUM_VISUAL_TOKENS
    calibration = task.make_split("train", args.calibration_n, seed=CALIBRATION_SEED)
    test = task.make_split("test", args.n, seed=TEST_SEED)
    torch.set_grad_enabled(False)
    start = time.time()
    results = {
        "task": args.task,
        "command": "python -m benchmarks.digits.calibrate_rtd "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "deft_checkpoint": folder,
        "calibration": {"split": "train", "seed": CALIBRATION_SEED, "n": args.calibration_n},
        "test": {"split": "test", "seed": TEST_SEED, "n": args.n},
        "target": args.target,
        "default_thresholds": {
            "entropy": DEFAULTS.deft_rtd_entropy_threshold,
            "confidence": DEFAULTS.deft_rtd_confidence_threshold,
        },
        "budgets": [],
    }
    for ratio in ratios:
        k = num_kept_tokens(n_tokens, ratio)
        model, processor = load(folder, method_settings("deft", ratio))
        stats = rtd_statistics(model, processor, calibration, args.batch_size)
        share = target_share(args.target, k, n_tokens)
        budget = {
            "retention_ratio": ratio,
            "kept_tokens": k,
            "target_share": share,
            "default_thresholds": describe(
                stats, DEFAULTS.deft_rtd_entropy_threshold, DEFAULTS.deft_rtd_confidence_threshold
            ),
            "calibrated": {},
            "test": {},
        }
        for mode, level in (("hybrid", "token"), ("adaptive", "sample")):
            s = stats[level]
            cal = calibrate_thresholds(torch.tensor(s["entropy"]), torch.tensor(s["confidence"]), share)
            budget["calibrated"][mode] = cal
            budget["calibrated"][mode]["statistics"] = describe(
                stats, cal["entropy_threshold"], cal["confidence_threshold"]
            )[level]
            print(
                f"ratio {ratio}: {mode} thresholds entropy {cal['entropy_threshold']:.6f} confidence "
                f"{cal['confidence_threshold']:.6f} flag {cal['share']:.1%} (target {share:.1%})",
                flush=True,
            )
        print(json.dumps(budget["default_thresholds"], indent=1)[:3000], flush=True)
        if not args.no_eval:
            rows = budget["test"]
            rows["fast"] = evaluate_config(
                folder, method_settings("deft", ratio), test, task, args.batch_size
            )
            for mode in ("hybrid", "adaptive"):
                cal = budget["calibrated"][mode]
                settings = method_settings(f"deft_{mode}", ratio)
                settings.update(
                    deft_rtd_entropy_threshold=cal["entropy_threshold"],
                    deft_rtd_confidence_threshold=cal["confidence_threshold"],
                )
                rows[mode] = evaluate_config(folder, settings, test, task, args.batch_size)
                # the share of the test's pruned tokens (hybrid) / samples (adaptive) actually rebuilt
                rows[mode]["share_rebuilt"] = (rows[mode]["mean_visual_tokens"] - k) / (n_tokens - k)
            seen = max(rows["hybrid"]["mean_visual_tokens"], rows["adaptive"]["mean_visual_tokens"])
            equal = int(np.floor(seen + 0.5))
            equal_ratio = equal / n_tokens
            rows["fast_equal_tokens"] = evaluate_config(
                folder, method_settings("deft", equal_ratio), test, task, args.batch_size
            )
            rows["fast_equal_tokens"]["retention_ratio"] = equal_ratio
            for name, row in rows.items():
                print(
                    f"ratio {ratio} {name:18}: {row['accuracy']:.1%} {row['wilson95']} "
                    f"({row['mean_visual_tokens']:.1f} visual tokens)",
                    flush=True,
                )
        results["budgets"].append(budget)
        results["wall_time_s"] = time.time() - start
        atomic_write_json(out_path, results)  # after every budget: a partial run keeps what it measured
    print(report(results))
    print(f"wrote {out_path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
