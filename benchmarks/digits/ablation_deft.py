"""DeFT ablation: each score component alone at inference, against the learned mixture (and the learned weights).

    python -m benchmarks.digits.ablation_deft --task dense --threads 1

Rows per budget, each on the same held-out queries as `evaluate_methods` (`TEST_SEED`), each loaded from the
DeFT checkpoint with `deft_score_components` (a config setting; the weights are not edited):
- `mixture`: the default (None: every component present; at inference semantic + group, with the learned
  softmax weights renormalised over the two);
- `semantic`: `["semantic"]`, the learned saliency `s~_sem` alone;
- `group`: `["group"]`, the group score `s~_group` alone;
- `coverage`: the learned mixture selected with a redundancy penalty (`deft_coverage_weight=COVERAGE_ABLATION`,
  greedy maximal marginal relevance on SAM's tokens) instead of plain top-k;
- `feedback (oracle)`: `["feedback"]` with the task-loss gradient of a full-token pass on the query WITH ITS
  ANSWER (teacher-forced labels, as in training): an upper reference that no deployment can run (it needs the
  answer). Its accuracy is teacher-forced: every answer token is the argmax given the true earlier answer
  tokens, which is the same event as "greedy generation starts with the answer" (the answer accuracy of the
  other rows); `mixture (teacher-forced)` checks that equality on the same checkpoint.
Answer accuracy, strict accuracy (generation rows), Wilson 95% intervals, and per question kind.
`--split train` runs the same rows on train-split validation queries (`calibrate_rtd.CALIBRATION_SEED`; source
images disjoint from the test split): the place to choose components without looking at the test split.
The learned mixture of each checkpoint: softmax of `score_mixer.mixture_logits` over all three components
(training) and over semantic + group (inference).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from modeling_deft_llava.configuration.deft_settings import num_kept_tokens
from modeling_deft_llava.training.trainer import feedback_gradients
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava import DeftLlavaProcessor
from modeling_deft_llava.deft.score_mixer import COMPONENTS

from .calibrate_rtd import CALIBRATION_SEED
from .common import (
    NUM_VISUAL_TOKENS,
    TEST_SEED,
    DigitsCollator,
    accuracy_by_kind,
    answer_token_ids,
    atomic_write_json,
)
from .data import wilson_interval
from .evaluate_methods import evaluate_config, load, method_settings
from .report_tables import pct
from .tasks import TASKS

COVERAGE_ABLATION = 0.3  # `deft_coverage_weight` of the `coverage` row (chosen on train-split queries)
# inference settings of each variant (the checkpoint's weights are never edited)
VARIANTS = {
    "mixture": {},
    "semantic": {"deft_score_components": ["semantic"]},
    "group": {"deft_score_components": ["group"]},
    "coverage": {"deft_coverage_weight": COVERAGE_ABLATION},
}


def mixture_weights(model) -> dict:
    """softmax(mixture_logits) over every component, and over the inference-time ones (semantic + group)."""
    mixer = model.model.active_method.score_mixer
    logits = mixer.mixture_logits.detach().float()
    return {
        "mixture_logits": dict(zip(COMPONENTS, logits.tolist())),
        "training": {k: float(v) for k, v in mixer.weights(COMPONENTS).items()},
        "inference": {k: float(v) for k, v in mixer.weights(("semantic", "group")).items()},
    }


@torch.no_grad()
def teacher_forced(model, processor, full_processor, samples, task, batch_size: int, oracle: bool) -> dict:
    """Teacher-forced answer accuracy (see the module docstring); `oracle`: DeFT gets the feedback gradient."""
    collate = DigitsCollator(processor, train=True)
    full_collate = DigitsCollator(full_processor, train=True)
    hits = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collate(chunk)
        labels = batch.pop("labels")
        extra = {}
        if oracle:
            full = full_collate(chunk)
            extra["deft_token_gradients"] = feedback_gradients(model, full, pixel_values=full["pixel_values"])
        # labels mark the answer, which a question-aware scorer must not read as the question
        out = model(**batch, labels=labels, use_cache=False, **extra)
        if out.deft_gather_index is not None:
            raise ValueError("teacher_forced expects fast mode (no re-packed rows)")
        pred = out.logits[:, :-1].argmax(-1)
        target = batch["input_ids"][:, 1:]
        labelled = labels[:, 1:] != -100
        for i, s in enumerate(chunk):
            positions = (
                labelled[i].nonzero().flatten()[: len(answer_token_ids(processor.tokenizer, s.answer))]
            )
            hits.append(bool((pred[i, positions] == target[i, positions]).all()))
    correct = int(sum(hits))
    n = len(samples)
    out = {"accuracy": correct / n, "correct": correct, "n": n, "wilson95": list(wilson_interval(correct, n))}
    if len(task.kinds) > 1:
        out["by_kind"] = accuracy_by_kind(hits, [s.kind for s in samples], task.kinds)
    return out


def train_command(folder: str) -> str | None:
    """The command that trained `folder` (its `train_deft_log.json`), or None."""
    path = os.path.join(folder, "train_deft_log.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("command")


def report(results: dict) -> str:
    """The README tables: the learned mixture of each checkpoint, then accuracy per variant and budget."""
    lines = [
        "| checkpoint | mixture logits (sem / fb / group) | training softmax | inference softmax (sem / group) |"
    ]
    lines.append("|---|---|---|---|")
    for label, info in results["checkpoints"].items():
        w = info["mixture_weights"]
        lines.append(
            f"| {label} | "
            + " / ".join(f"{w['mixture_logits'][c]:.4f}" for c in COMPONENTS)
            + " | "
            + " / ".join(f"{w['training'][c]:.3f}" for c in COMPONENTS)
            + f" | {w['inference']['semantic']:.3f} / {w['inference']['group']:.3f} |"
        )
    ratios = sorted({r["retention_ratio"] for r in results["rows"]}, reverse=True)
    lines += ["", "| checkpoint | score at inference | " + " | ".join(f"{r:.1%}" for r in ratios) + " |"]
    lines.append("|---|---|" + "---|" * len(ratios))
    names = {
        "mixture": "learned mixture (semantic + group)",
        "semantic": "semantic (saliency) alone",
        "group": "group alone",
        "oracle": "feedback alone (oracle: uses the answer)",
        "coverage": f"learned mixture, coverage {COVERAGE_ABLATION} (MMR)",
    }
    keys = []
    for r in results["rows"]:
        if (r["checkpoint"], r["variant"]) not in keys:
            keys.append((r["checkpoint"], r["variant"]))
    for label, variant in keys:
        cells = []
        for ratio in ratios:
            row = next(
                (
                    x
                    for x in results["rows"]
                    if (x["checkpoint"], x["variant"], x["retention_ratio"]) == (label, variant, ratio)
                ),
                None,
            )
            cells.append(pct(row) if row else "")
        lines.append(f"| {label} | {names[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="dense")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="comma-separated label=folder of DeFT checkpoints (default: trained=<the task's checkpoint>)",
    )
    parser.add_argument("--ratios", default="0.25,0.125")
    parser.add_argument("--variants", default="mixture,semantic,group,coverage,oracle")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="test: the held-out queries (TEST_SEED); train: train-split validation queries (calibrate_rtd's "
        "CALIBRATION_SEED), where a choice of components may be made without looking at the test split",
    )
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--threads", type=int, default=0)
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
    checkpoints = dict(
        item.split("=", 1) for item in (args.checkpoints or f"trained={task.deft_checkpoint}").split(",")
    )
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in (*VARIANTS, "oracle")]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid: {[*VARIANTS, 'oracle']}")
    suffix = "" if args.split == "test" else "_train_split"
    out_path = args.out or f"benchmarks/results/digits_{args.task}_ablation_components{suffix}.json"
    ratios = [float(r) for r in args.ratios.split(",") if r]
    seed = TEST_SEED if args.split == "test" else CALIBRATION_SEED
    samples = task.make_split(args.split, args.n, seed=seed)
    torch.set_grad_enabled(False)
    start = time.time()
    results = {
        "task": args.task,
        "command": "python -m benchmarks.digits.ablation_deft "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "n": args.n,
        "split": args.split,
        "seed": seed,
        "checkpoints": {},
        "rows": [],
    }
    for label, folder in checkpoints.items():
        model, _ = load(folder, method_settings("deft", 0.25))
        results["checkpoints"][label] = {
            "folder": folder,
            "mixture_weights": mixture_weights(model),
            # how it was trained (a git-ignored ablation folder is rebuilt by this command)
            "train_command": train_command(folder),
        }
        print(label, results["checkpoints"][label], flush=True)
        for ratio in ratios:
            k = num_kept_tokens(NUM_VISUAL_TOKENS, ratio)
            for variant in variants:
                row = {"checkpoint": label, "retention_ratio": ratio, "kept_tokens": k, "variant": variant}
                if variant == "oracle":
                    settings = {**method_settings("deft", ratio), "deft_score_components": ["feedback"]}
                    model, processor = load(folder, settings)
                    full_processor = DeftLlavaProcessor.from_pretrained(folder, use_deft=False)
                    row.update(
                        teacher_forced(model, processor, full_processor, samples, task, args.batch_size, True)
                    )
                    row["accuracy_kind"] = "teacher-forced (uses the answer)"
                    row["mean_visual_tokens"] = float(k)
                    # the same path without gradients: checks teacher-forced == generated answer accuracy
                    model, processor = load(folder, method_settings("deft", ratio))
                    check = teacher_forced(
                        model, processor, full_processor, samples, task, args.batch_size, False
                    )
                    row["mixture_teacher_forced_accuracy"] = check["accuracy"]
                else:
                    settings = {**method_settings("deft", ratio), **VARIANTS[variant]}
                    row.update(evaluate_config(folder, settings, samples, task, args.batch_size))
                    row["accuracy_kind"] = "greedy generation"
                results["rows"].append(row)
                print(
                    f"{label} ratio {ratio} {variant:9}: {row['accuracy']:.1%} {row['wilson95']}"
                    + (
                        f" (mixture teacher-forced {row['mixture_teacher_forced_accuracy']:.1%})"
                        if variant == "oracle"
                        else ""
                    ),
                    flush=True,
                )
                results["wall_time_s"] = time.time() - start
                atomic_write_json(out_path, results)
    print(report(results))
    print(f"wrote {out_path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
