"""What a DeFT checkpoint keeps on the dense task: per score component, how much of the canvas it covers.

    python -m benchmarks.digits.selection_diagnostics --checkpoint checkpoints/digits-dense-deft-llava \
        [--label shipped] [--ratios 0.5,0.25] [--n 1000] [--out benchmarks/results/digits_dense_selection.json]

On train-split queries (`calibrate_rtd.CALIBRATION_SEED`, never the test split), for the checkpoint's learned
mixture, each inference-time component alone (`deft_score_components`) and random selection (the base model),
at each budget: answer accuracy (greedy `generate`), and from the kept indices of a forward pass
- `cells_seen`: of the 9 digits, how many have at least one kept ink token;
- `asked_ink_kept`: the share of the asked digits' ink tokens that were kept;
- `background_kept`: kept tokens without any ink.
A selection that clumps (keeps whole blocks of neighbouring tokens) sees fewer cells at the same K. Results are
appended to `--out` under `--label` (one file holds several checkpoints, e.g. an earlier commit's).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from .ablation_deft import VARIANTS as ABLATION_VARIANTS
from .calibrate_rtd import CALIBRATION_SEED
from .common import DigitsCollator, atomic_write_json
from .evaluate_methods import evaluate_config, load, method_settings
from .tasks import TASKS

# the inference-time score components of the ablation (`ablation_deft.VARIANTS`), as settings
VARIANTS = {name: ABLATION_VARIANTS[name] for name in ("mixture", "semantic", "group")}


@torch.no_grad()
def coverage(folder: str, settings: dict, samples, batch_size: int) -> dict:
    """Mean cells seen, asked-ink share kept and background tokens kept (see the module docstring)."""
    model, processor = load(folder, settings)
    collate = DigitsCollator(processor, train=False)
    cells, asked_share, background = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        kept_all = model(**collate(chunk)).kept_indices
        for sample, kept in zip(chunk, kept_all):
            keep = np.zeros(64, dtype=bool)
            keep[kept.cpu().numpy()] = True
            ink = sample.ink_masks.reshape(9, 64)  # (cells, tokens)
            asked = ink[list(sample.asked_cells)].any(0)
            cells.append(int((ink & keep).any(1).sum()))
            asked_share.append(float((asked & keep).sum() / max(1, asked.sum())))
            background.append(int((keep & ~ink.any(0)).sum()))
    return {
        "cells_seen": float(np.mean(cells)),
        "asked_ink_kept": float(np.mean(asked_share)),
        "background_kept": float(np.mean(background)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=TASKS["dense"].deft_checkpoint)
    parser.add_argument("--label", default="shipped")
    parser.add_argument("--ratios", default="0.5,0.25")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/digits_dense_selection.json")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        parser.error(f"checkpoint folder {args.checkpoint!r} has no config.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = TASKS["dense"]
    samples = task.make_split("train", args.n, seed=CALIBRATION_SEED)
    results = {"task": "dense", "split": "train", "seed": CALIBRATION_SEED, "n": args.n, "checkpoints": {}}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results = json.load(f)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        configs = {
            name: (args.checkpoint, {**method_settings("deft", ratio), **settings})
            for name, settings in VARIANTS.items()
        }
        configs["random"] = (task.checkpoint, method_settings("random", ratio))
        for name, (folder, settings) in configs.items():
            row = {"variant": name, "retention_ratio": ratio}
            accuracy = evaluate_config(folder, settings, samples, task, args.batch_size)
            row.update({k: accuracy[k] for k in ("accuracy", "wilson95", "by_kind") if k in accuracy})
            row.update(coverage(folder, settings, samples, args.batch_size))
            rows.append(row)
            print(
                f"{args.label} {ratio:.3f} {name:9}: {row['accuracy']:.1%}, cells seen {row['cells_seen']:.2f}/9, "
                f"asked ink kept {row['asked_ink_kept']:.0%}, background kept {row['background_kept']:.1f}",
                flush=True,
            )
    results["checkpoints"][args.label] = {
        "folder": args.checkpoint,
        "command": "python -m benchmarks.digits.selection_diagnostics "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "rows": rows,
    }
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
