"""DeFT ready right after `convert`: a label-free warm start measured against its teacher and random DeFT weights.

    python -m benchmarks.digits.warm_start_eval --task easy --n 1000 --threads 1
    python -m benchmarks.digits.warm_start_eval --task dense --n 1000 --threads 1

1. Converts the task's all-token base checkpoint into a DeftLlava folder with fresh DeFT modules
   (`commands.convert`; semantic / saliency widths read from the task's shipped DeFT checkpoint, so every DeFT
   row has the same sizes), the starting point a user of `convert` gets.
2. Writes unlabelled training canvases (images only, the training split `train_deft` uses) as PNG files.
3. Warm-starts the converted folder once per teacher (`training/warm_start.py`: only DeFT's scorer trains, no
   language model), reporting top-k agreement with the teacher on held-out canvases before and after.
4. Answers the task's held-out questions (greedy `generate`) at each budget with: the warm-started DeFT, the
   random-init DeFT (the converted folder as is), the feedback-trained DeFT checkpoint the repo ships, and each
   teacher run as a method: `visionzip_dominant` (VisionZip with `contextual_ratio=0`: exactly the top-k of
   the CLS attention the `cls_attention` teacher ranks by), `visionzip` (its defaults, for reference) and
   `divprune` (exactly the top-k of the `divprune` teacher's order); and `random` (a seeded random subset),
   the level a scorer with no knowledge should reach.

Writes `benchmarks/results/digits[_dense]_warm_start.json` (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from modeling_deft_llava.commands.convert import convert
from modeling_deft_llava.configuration.deft_settings import num_kept_tokens
from modeling_deft_llava.training.warm_start import (
    TEACHERS,
    WarmStartArguments,
    list_images,
    teacher_agreement,
    warm_start,
)
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

from .common import NUM_VISUAL_TOKENS, TEST_SEED, atomic_write_json, evaluate_generate
from .evaluate_methods import load, method_settings, score
from .tasks import TASKS
from .train_deft import TRAIN_SEED

# the registered method that keeps exactly each teacher's top-k (see the module docstring)
TEACHER_METHODS = {"cls_attention": "visionzip_dominant", "divprune": "divprune"}
# rows of the table: label -> (registered method, compression_settings)
BASELINE_ROWS = {
    "visionzip_dominant": ("visionzip", {"contextual_ratio": 0.0}),
    "visionzip": ("visionzip", None),
    "divprune": ("divprune", None),
    "random": ("random", None),
}


def write_images(folder: str, samples) -> str:
    """The canvases of `samples` as PNG files (no questions, no answers); returns `folder`."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".png"):
            os.remove(os.path.join(folder, name))
    for i, sample in enumerate(samples):
        sample.pil_image().save(os.path.join(folder, f"canvas_{i:05d}.png"))
    return folder


def results_path(task) -> str:
    """`digits_accuracy.json` -> `digits_warm_start.json` (and the dense task's likewise)."""
    return task.results.replace("_accuracy.json", "_warm_start.json")


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="easy")
    parser.add_argument("--teachers", default=",".join(TEACHERS))
    parser.add_argument("--train-images", type=int, default=2000, help="unlabelled training canvases")
    parser.add_argument("--agreement-images", type=int, default=500, help="held-out canvases for agreement")
    parser.add_argument("--steps", type=int, default=None, help="default: WarmStartArguments.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="default: WarmStartArguments.batch_size")
    parser.add_argument("--seed", type=int, default=None, help="default: WarmStartArguments.seed")
    parser.add_argument("--ratios", default="0.25,0.125")
    parser.add_argument("--n", type=int, default=1000, help="held-out questions")
    parser.add_argument("--eval-batch-size", type=int, default=125)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<task>_warm_start.json")
    parser.add_argument(
        "--work-dir", default=None, help="intermediate folders (default: the task's git-ignored _work/)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    teachers = [t for t in args.teachers.split(",") if t]
    bad = [t for t in teachers if t not in TEACHERS]
    if bad or not teachers:
        parser.error(f"--teachers must list some of {TEACHERS}, got {args.teachers!r}")
    ratios = [float(r) for r in args.ratios.split(",") if r]
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        parser.error(f"--ratios must be numbers in (0, 1], got {args.ratios!r}")
    for name in ("train_images", "agreement_images", "n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out_path = args.out or results_path(task)

    def work(name: str) -> str:
        return os.path.join(args.work_dir, name) if args.work_dir else task.work(name)

    command = "python -m benchmarks.digits.warm_start_eval " + " ".join(
        argv if argv is not None else os.sys.argv[1:]
    )
    start = time.time()

    # 1. the starting point a user of `convert` gets, sized like the shipped DeFT checkpoint
    with open(os.path.join(task.deft_checkpoint, "config.json")) as f:
        shipped = json.load(f)
    init = work("warm_start_init")
    convert(
        task.checkpoint,
        init,
        overwrite=True,
        use_deft=True,
        deft_retention_ratio=ratios[0],
        deft_semantic_dim=shipped["deft_semantic_dim"],
        deft_saliency_hidden_dim=shipped["deft_saliency_hidden_dim"],
    )
    # 2. unlabelled canvases: training split for the warm start, held-out canvases for the agreement report
    train_folder = write_images(
        work("warm_start_images"), task.make_split("train", args.train_images, seed=TRAIN_SEED)
    )
    heldout_folder = write_images(
        work("warm_start_heldout_images"), task.make_split("test", args.agreement_images, seed=TEST_SEED)
    )
    heldout = list_images(heldout_folder)

    # 3. one warm start per teacher
    options = {k: getattr(args, k) for k in ("steps", "batch_size", "seed") if getattr(args, k) is not None}
    folders = {"deft (random init)": init, "deft (feedback-trained, shipped)": task.deft_checkpoint}
    warm_logs, agreement = {}, {}
    init_model = DeftLlavaForConditionalGeneration.from_pretrained(init).eval()
    processor = DeftLlavaProcessor.from_pretrained(init)
    for teacher in teachers:
        folder = work(f"warm_start_{teacher}")
        t0 = time.time()
        log = warm_start(
            WarmStartArguments(
                model_folder=init, images=train_folder, out=folder, teacher=teacher, overwrite=True, **options
            ),
            command=command,
        )
        log = {k: v for k, v in log.items() if k != "loss_every_step"}
        log["wall_time_s"] = time.time() - t0
        warm_logs[teacher] = log
        folders[f"deft (warm start: {teacher})"] = folder
        model = DeftLlavaForConditionalGeneration.from_pretrained(folder).eval()
        agreement[teacher] = {
            str(r): {
                "random_init": teacher_agreement(init_model, processor, heldout, teacher, r, 125),
                "warm_start": teacher_agreement(model, processor, heldout, teacher, r, 125),
            }
            for r in ratios
        }
        print(f"top-k agreement with {teacher} on {len(heldout)} held-out canvases: {agreement[teacher]}")

    # 4. accuracy on the held-out questions
    samples = task.make_split("test", args.n, seed=TEST_SEED)
    torch.set_grad_enabled(False)

    def run(folder: str, settings: dict, desc: str) -> dict:
        model, proc = load(folder, settings)
        res = evaluate_generate(
            model, proc, samples, args.eval_batch_size, desc=desc, max_new_tokens=task.max_answer_tokens + 1
        )
        return score(res, samples, proc.tokenizer, task.kinds)

    full = run(task.checkpoint, method_settings("full", 1.0), "full")
    rows = []
    labels = [*folders] + [
        m for m in BASELINE_ROWS if m != "visionzip_dominant" or "cls_attention" in teachers
    ]
    for label in labels:
        for ratio in ratios:
            if label in folders:
                folder, settings = folders[label], method_settings("deft", ratio)
            else:
                method, extra = BASELINE_ROWS[label]
                folder, settings = task.checkpoint, method_settings(method, ratio)
                if extra:
                    settings["compression_settings"] = extra
            res = run(folder, settings, f"{label}@{ratio}")
            rows.append(
                {
                    "method": label,
                    "retention_ratio": ratio,
                    "kept_tokens": num_kept_tokens(NUM_VISUAL_TOKENS, ratio),
                    **res,
                    "share_of_full": res["accuracy"] / full["accuracy"],
                }
            )
            print(f"{label:36} {ratio:6.4f}: {res['accuracy']:.1%} (strict {res['strict_accuracy']:.1%})")

    results = {
        "task": args.task,
        "command": command,
        "base": task.checkpoint,
        "shipped_deft_checkpoint": task.deft_checkpoint,
        "deft_sizes": {k: shipped[k] for k in ("deft_semantic_dim", "deft_saliency_hidden_dim")},
        "train_images": args.train_images,
        "train_seed": TRAIN_SEED,
        "agreement_images": len(heldout),
        "n": args.n,
        "test_seed": TEST_SEED,
        "torch_threads": torch.get_num_threads(),
        "teacher_methods": TEACHER_METHODS,
        "metric": score.__doc__,
        "full": full,
        "warm_start": warm_logs,
        "teacher_agreement": agreement,
        "rows": rows,
        "wall_time_s": time.time() - start,
    }
    atomic_write_json(out_path, results)
    print(markdown_table(results))
    print(f"wrote {out_path} in {results['wall_time_s']:.0f} s")


def markdown_table(results: dict) -> str:
    """Answer accuracy / strict accuracy per method and budget."""
    ratios = sorted({r["retention_ratio"] for r in results["rows"]}, reverse=True)
    head = "| method | " + " | ".join(
        f"{r:g} ({num_kept_tokens(NUM_VISUAL_TOKENS, r)} tokens)" for r in ratios
    )
    lines = [head + " |", "|---" * (len(ratios) + 1) + "|"]
    for method in dict.fromkeys(r["method"] for r in results["rows"]):
        cells = []
        for ratio in ratios:
            row = next(r for r in results["rows"] if r["method"] == method and r["retention_ratio"] == ratio)
            cells.append(f"{row['accuracy']:.1%} / {row['strict_accuracy']:.1%}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
