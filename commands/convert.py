"""Convert a stock llava-hf checkpoint folder into a complete DeFT-LLaVA folder (model, config, processor).

A `llava` folder becomes a DeFT-LLaVA folder, a `llava_next` folder a DeFT-LLaVA-NeXT one.

    python -m modeling_deft_llava.commands.convert STOCK_FOLDER OUT_FOLDER [--deft-retention-ratio 0.25] [--use-deft] ...

Reads both key layouts (transformers 5 `model.language_model.*` and the older `language_model.model.*` that
the public llava-hf repos and stock `save_pretrained` write). The DeFT modules are new: they are initialised
fresh, listed in the log, and should be trained (see `training/`), or warm-started without labels
(`commands/warm_start.py`). The output folder is written with
`utilities/atomic_write.py` (built next to it, then renamed into place; `--overwrite` swaps the old folder out in
one step and deletes it afterwards): a kill at any point leaves the old folder or the new one, and an existing
non-empty folder is never touched without `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..configuration.anyres_settings import AnyResSettings
from ..configuration.deft_settings import DEFT_METHOD, DEFT_RECIPE, DeftSettings
from ..modeling_deft_llava import DeftLlavaForConditionalGeneration
from ..modeling_deft_llava_next import DeftLlavaNextForConditionalGeneration
from ..processing.processing_deft_llava import PROCESSOR_DEFT_KEYS, DeftLlavaProcessor
from ..processing.processing_deft_llava_next import PROCESSOR_KEYS, DeftLlavaNextProcessor
from ..training.folders import check_readable_folder
from ..utilities.atomic_write import place, staged

# LLaVA-NeXT (AnyRes) folders become DeFT-LLaVA-NeXT folders; every other folder a DeFT-LLaVA one
ANYRES_MODEL_TYPES = ("llava_next", "deft_llava_next")

logger = logging.getLogger(__name__)


def convert(stock_folder: str, out_folder: str, overwrite: bool = False, **deft_settings) -> list[str]:
    """Write a DeFT-LLaVA folder from `stock_folder`; returns the names of the freshly initialised weights.

    DeFT's scorer follows `DEFT_RECIPE` (question- and position-aware, ListNet) for every recipe setting that
    neither `deft_settings` nor the folder's config.json gives; pass e.g. `deft_question_aware=False` for the
    seed's scorer. A LLaVA-NeXT folder (`model_type` "llava_next") becomes a DeFT-LLaVA-NeXT folder (the AnyRes
    settings `anyres_budget`, `anyres_image_newline` are accepted too), with the same recipe."""
    check_readable_folder(stock_folder, "checkpoint folder")
    config_path = os.path.join(stock_folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{stock_folder!r} is not a checkpoint folder: it has no config.json")
    with open(config_path) as f:
        present = json.load(f)
    anyres = present.get("model_type") in ANYRES_MODEL_TYPES
    deft_settings = {
        **{k: v for k, v in DEFT_RECIPE.items() if k not in present and k not in deft_settings},
        **deft_settings,
    }
    valid = set(DeftSettings.field_names()) | {"compression_method"}
    valid |= set(AnyResSettings.field_names()) if anyres else set()
    unknown = sorted(set(deft_settings) - valid)
    if unknown:
        raise ValueError(f"unknown DeFT settings {unknown}; valid: {sorted(valid)}")
    model_class = DeftLlavaNextForConditionalGeneration if anyres else DeftLlavaForConditionalGeneration
    processor_class = DeftLlavaNextProcessor if anyres else DeftLlavaProcessor
    processor_keys = PROCESSOR_KEYS if anyres else PROCESSOR_DEFT_KEYS
    not_empty = f"{out_folder!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
    if os.path.isdir(out_folder) and os.listdir(out_folder) and not overwrite:
        raise ValueError(not_empty)
    model, info = model_class.from_pretrained(stock_folder, output_loading_info=True, **deft_settings)
    unexpected = sorted(info["unexpected_keys"])
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} weights of {stock_folder!r} were not recognised, e.g. {unexpected[:3]}"
        )
    new = sorted(info["missing_keys"])
    not_deft = [k for k in new if not k.startswith("model.deft.") and k != "lm_head.weight"]
    if not_deft:
        raise ValueError(f"{stock_folder!r} lacks backbone weights, e.g. {not_deft[:3]}: refusing to convert")
    processor = processor_class.from_pretrained(
        stock_folder, **{k: v for k, v in deft_settings.items() if k in processor_keys}
    )
    with staged(os.path.abspath(out_folder)) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            place(staging, os.path.abspath(out_folder), overwrite=overwrite)
        except FileExistsError as error:  # another program wrote into the empty folder meanwhile
            raise ValueError(f"{not_empty} ({error})") from error
    logger.warning("initialised %d new DeFT weights (train them): %s", len(new), new)
    return new


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DeftSettings()  # every default below is the config field's (the single source)
    parser.add_argument(
        "stock_folder", help="a stock llava-hf folder (llava or llava_next), or a DeFT folder"
    )
    parser.add_argument("out_folder", help="where the DeFT-LLaVA folder is written (new, or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_folder")
    parser.add_argument(
        "--use-deft",
        dest="use_deft",
        action="store_true",
        default=True,
        help="compression on in the written config (the default)",
    )
    parser.add_argument("--no-deft", dest="use_deft", action="store_false", help="compression off")
    parser.add_argument(
        "--deft-retention-ratio",
        type=float,
        help=f"share of visual tokens kept, in (0, 1] (default: the source folder's, else {defaults.deft_retention_ratio})",
    )
    parser.add_argument(
        "--deft-inference-mode",
        choices=["fast", "hybrid", "adaptive"],
        help=f"DeFT's Recoverable Token Dictionary mode (default: the source folder's, else {defaults.deft_inference_mode})",
    )
    parser.add_argument(
        "--deft-semantic-dim",
        type=int,
        help=f"width of DeFT's semantic space (default: the source folder's, else {defaults.deft_semantic_dim}, the seed's)",
    )
    parser.add_argument(
        "--compression-method",
        help=f"deft or a baseline (docs/methods.md; default: the source folder's, else {DEFT_METHOD!r})",
    )
    parser.add_argument("--anyres-budget", choices=["image", "view"], help="LLaVA-NeXT folders only")
    parser.add_argument(
        "--anyres-image-newline", choices=["keep", "compress"], help="LLaVA-NeXT folders only"
    )
    parser.add_argument(
        "--seed-scorer",
        action="store_true",
        help="DeFT's scorer as the seed README describes it (question- and position-blind, MSE), not DEFT_RECIPE",
    )
    args = parser.parse_args(argv)
    seed_scorer = vars(args).pop("seed_scorer")
    settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("stock_folder", "out_folder", "overwrite") and value is not None
    }
    if seed_scorer:
        settings.update({key: DeftSettings.__dataclass_fields__[key].default for key in DEFT_RECIPE})
    try:
        new = convert(args.stock_folder, args.out_folder, overwrite=args.overwrite, **settings)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if not new:  # a DeFT folder converted again: every DeFT weight came from it
        print(
            f"wrote {args.out_folder}; every DeFT weight was already in {args.stock_folder} (none initialised)"
        )
        return
    print(
        f"wrote {args.out_folder}; {len(new)} new DeFT weights were initialised: train them before use, or "
        f"warm-start them on unlabelled images (python -m modeling_deft_llava.commands.warm_start "
        f"{args.out_folder} --images IMAGE_FOLDER --out WARM_FOLDER)"
    )


if __name__ == "__main__":
    main()
