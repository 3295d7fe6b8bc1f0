"""Label-free warm start of DeFT's scorer on a folder of unlabelled images (training/warm_start.py).

    python -m modeling_deft_llava.commands.warm_start MODEL_FOLDER --images IMAGE_FOLDER --out OUT_FOLDER \
        [--teacher divprune|cls_attention] [--steps 300] [--batch-size 32] [--seed 0] [--eval-images FOLDER] \
        [--threads 1]

Trains only DeFT's scoring modules of a DeftLlava folder (e.g. straight from `convert`) to rank visual tokens as
a training-free teacher does (no labels, no language-model pass), with a progress bar, and writes the model,
processor and `warm_start_log.json` to OUT_FOLDER atomically (never over a non-empty folder without
`--overwrite`). Every default lives in `WarmStartArguments`.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields

from ..training.warm_start import WarmStartArguments, command_line, warm_start

POSITIONAL = ("model_folder",)


def build_parser() -> argparse.ArgumentParser:
    """One flag per `WarmStartArguments` field, with that field's default and help."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    hints = typing.get_type_hints(WarmStartArguments)
    for f in fields(WarmStartArguments):
        help_text = f.metadata.get("help", "")
        if f.name in POSITIONAL:
            parser.add_argument(f.name, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kind = {int: int, float: float, int | None: int, float | None: float}.get(hints[f.name], str)
        if f.default is MISSING:
            parser.add_argument(flag, dest=f.name, type=kind, required=True, help=help_text)
        else:
            shown = f" (default: {f.default})" if f.default is not None else ""
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text + shown)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        log = warm_start(WarmStartArguments(**vars(args)), command=command_line(argv))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    agreement = log["agreement"]
    line = f"wrote {args.out}; loss {log['first_loss']:.4f} -> {log['last_loss']:.4f}"
    if agreement:
        line += (
            f"; held-out top-k agreement with {args.teacher} at ratio {log['agreement_ratio']}: "
            f"{agreement['eval_before']:.3f} -> {agreement['eval_after']:.3f}"
        )
    print(line)


if __name__ == "__main__":
    main()
