"""Markdown tables of a text-context benchmark result (`benchmarks/text_context.py`), for the README.

    python -m benchmarks.text_context_table benchmarks/results/text_context_compare.json

One table per test set (the trained context length, then each `--long-facts` one): a row per method, a column
per budget. Cell: accuracy / share of questions whose asked key and value were both kept (`-` where no single
kept set exists: kvpress prunes each KV head on its own) / tokens per decoder layer (mean over layers) / KV
entries per layer after the prefill / prefill ms of one prompt (median).
"""

from __future__ import annotations

import argparse
import json
import math

ORDER = ("deft", "deft_untrained", "random", "first", "last", "fastv", "fastv_pre")
LABELS = {
    "deft": "deft (feedback-trained)",
    "deft_untrained": "deft (untrained scorers)",
    "fastv": "fastv (inside the decoder)",
    "fastv_pre": "fastv_pre (before the LM)",
}


def cell(result: dict) -> str:
    kept = result["asked_fact_kept"]
    ms = result["prefill_ms"]
    return " / ".join(
        [
            f"{100 * result['accuracy']:.1f}%",
            "-" if kept is None else f"{kept:.2f}",
            f"{result['tokens_per_layer']:.1f}",
            f"{result['kv_per_layer']:.1f}",
            "-" if ms is None else f"{ms:.1f}",
        ]
    )


def table(results: dict, ratios: list[float], context_tokens: int) -> str:
    """The Markdown table of one test set's `results` (method@ratio -> result)."""
    methods = list(ORDER) + sorted(
        {name.split("@")[0] for name in results if name.startswith("kvpress_") and "@" in name}
    )
    header = "| method | all " + str(context_tokens) + " | "
    header += " | ".join(f"{100 * r:.1f}% ({math.floor(r * context_tokens + 0.5)})" for r in ratios) + " |"
    lines = [header, "|" + "---|" * (len(ratios) + 2)]
    lines.append(f"| none | {cell(results['full'])} |" + " |" * len(ratios))
    if "kvpress_none" in results:
        lines.append(f"| kvpress path, no press | {cell(results['kvpress_none'])} |" + " |" * len(ratios))
    for method in methods:
        cells = [results.get(f"{method}@{r:.3f}") for r in ratios]
        if all(c is None for c in cells):
            continue
        row = " | ".join("n/a" if c is None else cell(c) for c in cells)
        lines.append(f"| {LABELS.get(method, method)} | | {row} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", help="a JSON written by benchmarks/text_context.py")
    args = ap.parse_args(argv)
    with open(args.result) as f:
        report = json.load(f)
    ratios = report["settings"]["ratios"]
    facts = report["settings"]["facts"]
    parts = [f"{facts} facts ({report['command']}):", table(report["results"], ratios, 7 * facts)]
    for extra in report.get("longer_contexts", {}).values():
        parts += [
            f"\n{extra['facts']} facts (same model):",
            table(extra["results"], ratios, 7 * extra["facts"]),
        ]
    if "error" in report.get("kvpress", {}):
        parts.append(f"\nkvpress: {report['kvpress']['error']}")
    text = "\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
