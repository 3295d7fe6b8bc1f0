"""Write the model card of the shipped digits checkpoint from the measured results file.

    python -m benchmarks.digits.model_card [--checkpoint checkpoints/digits-deft-llava] \
        [--results benchmarks/results/digits_accuracy.json]
    python -m benchmarks.digits.model_card --task dense   # -> checkpoints/digits-dense-deft-llava/README.md

Every number in the card comes from the results file (written by `benchmarks.digits.evaluate_methods`).
"""

from __future__ import annotations

import argparse
import json
import os

from modeling_deft_llava.hub_card.model_card import build_model_card

from modeling_deft_llava import DeftLlavaConfig

from .tasks import TASKS

QUESTIONS = {
    "easy": "two-digit questions",
    "dense": "dense 3x3-digit questions (benchmarks/digits/README.md, dense task)",
}


def results_rows(results: dict) -> dict:
    rows = {
        "all 64 tokens": {
            "visual tokens seen": 64.0,
            "accuracy": round(results["full"]["accuracy"], 4),
            "95% CI": "[{:.3f}, {:.3f}]".format(*results["full"]["wilson95"]),
            "share of full": 1.0,
            "strict (answer + </s>)": round(results["full"]["strict_accuracy"], 4),
        }
    }
    for row in results["rows"]:
        if row.get("accuracy") is None:
            continue
        rows[f"{row['method']} @ {row['retention_ratio']}"] = {
            "visual tokens seen": round(row["mean_visual_tokens"], 1),
            "accuracy": round(row["accuracy"], 4),
            "95% CI": "[{:.3f}, {:.3f}]".format(*row["wilson95"]),
            "share of full": round(row["share_of_full"], 4),
            "strict (answer + </s>)": round(row["strict_accuracy"], 4),
        }
    return rows


def dense_summary(path: str) -> str:
    """A paragraph on the dense benchmark (where the budget bites) for the easy checkpoint's card, from its JSON."""
    with open(path) as f:
        dense = json.load(f)
    lines = [
        "\n## Dense digits benchmark (where the budget bites)\n",
        f"On 3x3 grids of digits (a separate base model and DeFT checkpoint, `digits-dense-deft-llava`; all 64 tokens "
        f"{dense['full']['accuracy']:.1%}), answer accuracy of DeFT against the best method that gives the language "
        "model the same K tokens at original positions:\n",
        "| kept | deft | best such baseline |",
        "|---|---|---|",
    ]
    in_llm = ("fastv", "ficoco_l")  # they prune inside the language model: not the same compute
    for ratio in sorted({r["retention_ratio"] for r in dense["rows"]}, reverse=True):
        rows = [
            r
            for r in dense["rows"]
            if r["retention_ratio"] == ratio
            and r.get("accuracy") is not None
            and r["positions"] == "original"
        ]
        deft = next((r for r in rows if r["method"] == "deft"), None)
        others = [r for r in rows if not r["method"].startswith("deft") and r["method"] not in in_llm]
        if deft is None or not others:
            continue
        best = max(others, key=lambda r: r["accuracy"])
        lines.append(f"| {ratio:.2%} | {deft['accuracy']:.1%} | {best['method']} {best['accuracy']:.1%} |")
    lines.append(f"\nCommand: `{dense['command']}`.\n")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="easy")
    parser.add_argument("--checkpoint", default=None, help="default: the task's DeFT checkpoint (tasks.py)")
    parser.add_argument("--results", default=None, help="default: the task's results JSON (tasks.py)")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.checkpoint, args.results = args.checkpoint or task.deft_checkpoint, args.results or task.results
    for path in (os.path.join(args.checkpoint, "config.json"), args.results):
        if not os.path.isfile(path):
            parser.error(f"{path!r} not found")
    config = DeftLlavaConfig.from_pretrained(args.checkpoint)
    with open(args.results) as f:
        results = json.load(f)
    card = build_model_card(
        config, results_rows(results), model_name="DeFT-LLaVA digits (tiny, trained here)"
    )
    text = str(card) + (
        f"\n\nResults: {results['n']} held-out {QUESTIONS[args.task]} (seed {results['test_seed']}), greedy "
        f"decoding; `accuracy` = the answer tokens are right, `strict` = the generation is exactly the answer. "
        f"Command: `{results['command']}`.\n"
    )
    if args.task == "easy" and os.path.isfile(TASKS["dense"].results):
        text += dense_summary(TASKS["dense"].results)
    tmp = os.path.join(args.checkpoint, ".README.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(args.checkpoint, "README.md"))
    print(f"wrote {os.path.join(args.checkpoint, 'README.md')}")


if __name__ == "__main__":
    main()
