"""Markdown tables for the README from the digits benchmark's JSON files (nothing is measured here).

.venv/bin/python -m benchmarks.digits.report_tables --task dense
"""

from __future__ import annotations

import argparse
import json

from .tasks import TASKS


def pct(e: dict) -> str:
    return f"{100 * e['accuracy']:.1f}% [{100 * e['wilson95'][0]:.1f}, {100 * e['wilson95'][1]:.1f}]"


def validity_table(path: str) -> str:
    report = json.load(open(path))
    results = report["results"]
    kinds = list(next(iter(results.values())).get("by_kind", {}))
    head = "| condition | tokens | accuracy [Wilson 95%] | " + " | ".join(kinds) + " |"
    lines = [f"`{report['command']}` ({report['heldout']['samples']} held-out queries)", "", head]
    lines.append("|" + "---|" * (3 + len(kinds)))
    for name, e in results.items():
        per_kind = " | ".join(f"{100 * e['by_kind'][k]['accuracy']:.1f}%" for k in kinds)
        tokens = e.get("kept_visual_tokens_mean", 64)
        lines.append(f"| {name} | {tokens:.1f} | {pct(e)} | {per_kind} |")
    return "\n".join(lines)


def methods_tables(path: str) -> str:
    res = json.load(open(path))
    ratios = sorted({r["retention_ratio"] for r in res["rows"]}, reverse=True)
    full = res["full"]
    lines = [f"`{res['command']}` ({res['n']} held-out queries)", ""]
    lines.append(f"All 64 tokens: {pct(full)}, strict {100 * full['strict_accuracy']:.1f}%.")
    if "full_deft_checkpoint" in res:
        lines.append(f"All 64 tokens, DeFT checkpoint: {pct(res['full_deft_checkpoint'])}.")
    lines += ["", "Answer accuracy [Wilson 95%] / strict exact match:", ""]
    lines.append("| method | " + " | ".join(f"{100 * r:g}%" for r in ratios) + " |")
    lines.append("|" + "---|" * (1 + len(ratios)))
    for method in res["methods"]:
        cells = []
        for ratio in ratios:
            row = next(r for r in res["rows"] if r["method"] == method and r["retention_ratio"] == ratio)
            cells.append(
                "n/a" if row.get("accuracy") is None else f"{pct(row)} / {100 * row['strict_accuracy']:.1f}%"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "prefill_flops" in full:
        lines += [
            "",
            "Cost per query (prefill; FLOPs share of all 64 tokens; time: batch of "
            f"{full['prefill_batch']}, {res.get('torch_threads')} thread, median of 3):",
            "",
        ]
        lines.append(
            "| method | budget | visual tokens per LM layer | FLOPs (M) | FLOPs share | prefill ms |"
        )
        lines.append("|---|---|---|---|---|---|")
        lines.append(
            f"| all tokens | 100% | 64 | {full['prefill_flops'] / 1e6:.1f} | 100% | {1e3 * full['prefill_s']:.0f} |"
        )
        for row in res["rows"]:
            if row.get("accuracy") is None or row["positions"] != "original":
                continue
            lines.append(
                f"| {row['method']} | {100 * row['retention_ratio']:g}% | "
                f"{row['mean_visual_tokens_per_lm_layer']:.1f} | {row['prefill_flops'] / 1e6:.1f} | "
                f"{100 * row['prefill_flops'] / full['prefill_flops']:.0f}% | {1e3 * row['prefill_s']:.0f} |"
            )
    lines += [
        "",
        "Best and worst method per budget (gap in points; are the 95% Wilson intervals disjoint?):",
        "",
    ]
    lines.append("| budget | rows compared | best | worst | spread | disjoint |")
    lines.append("|---|---|---|---|---|---|")
    in_lm = ("fastv", "ficoco_l", "deft_hybrid", "deft_adaptive")  # see more than K visual tokens somewhere
    scopes = {
        "every row": lambda r: True,
        "original positions": lambda r: r["positions"] == "original",
        "original, LM sees only K": lambda r: r["positions"] == "original" and r["method"] not in in_lm,
    }
    for ratio in ratios:
        for scope, keep in scopes.items():
            rows = [
                r
                for r in res["rows"]
                if r["retention_ratio"] == ratio and r.get("accuracy") is not None and keep(r)
            ]
            if len(rows) < 2:
                continue
            b = max(rows, key=lambda r: r["accuracy"])
            w = min(rows, key=lambda r: r["accuracy"])
            lines.append(
                f"| {100 * ratio:g}% | {scope} | {b['method']} {pct(b)} | {w['method']} {pct(w)} | "
                f"{100 * (b['accuracy'] - w['accuracy']):.1f} | {w['wilson95'][1] < b['wilson95'][0]} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="dense")
    parser.add_argument("--validity", default=None)
    parser.add_argument("--results", default=None)
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    print(validity_table(args.validity or task.validity))
    print()
    print(methods_tables(args.results or task.results))


if __name__ == "__main__":
    main()
