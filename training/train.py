"""Fine-tune DeFT-LLaVA with PEFT LoRA and `transformers.Trainer`: `python -m modeling_deft_llava.training.train`.

    python -m modeling_deft_llava.training.train --model_name_or_path base/ --data_path data.json \
        --output_dir run/ --max_steps 1000 --per_device_train_batch_size 8 --learning_rate 2e-4

Arguments: `DeftLlavaFinetuneArguments` plus every `transformers.TrainingArguments` flag (`--help`). The same
command runs under `torchrun --nproc_per_node 2 -m modeling_deft_llava.training.train ...` and
`accelerate launch --num_processes 2 -m modeling_deft_llava.training.train ...` (training/README.md).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from contextlib import nullcontext

import datasets
import torch
import transformers
from modeling_deft_llava.utilities.atomic_write import remove_tree, run_lock
from transformers import HfArgumentParser, TrainingArguments, set_seed

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.compressors.compression_registry import method_class

from .arguments import DeftLlavaFinetuneArguments
from .collator import DeftLlavaDataCollator
from .data import ConversationDataset
from .folders import check_readable_folder
from .lora import prepare_model_for_finetuning
from .saving import merge_and_export
from .trainer import (
    DeftLlavaTrainer,
    final_save_complete,
    last_complete_checkpoint,
    recover_output_dir,
    unmarked_checkpoints,
)

logger = logging.getLogger("modeling_deft_llava.training")


def parse_args(argv: list[str] | None = None) -> tuple[DeftLlavaFinetuneArguments, TrainingArguments]:
    """Parse command-line flags (or `argv`) into the two dataclasses."""
    parser = HfArgumentParser((DeftLlavaFinetuneArguments, TrainingArguments))
    finetune_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return finetune_args, training_args


def feedback_enabled(model, args: DeftLlavaFinetuneArguments) -> bool:
    """Feedback-guided scoring needs a method that learns from task-loss gradients (`learns_from_feedback`:
    DeFT) and a non-zero interval."""
    config = model.config
    if not (args.feedback_every_n_steps > 0 and config.use_deft):
        return False
    return method_class(config.compression_method).learns_from_feedback


def _setup_logging(training_args: TrainingArguments) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    # our own messages (data counts, resume point, trainable share) at INFO on the main process
    ours = min(level, logging.INFO) if training_args.should_log else level
    logging.getLogger("modeling_deft_llava").setLevel(ours)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def _looks_like_a_hub_id(name: str) -> bool:
    """`owner/name` (or `name`): not a path that starts at a folder (`/`, `./`, `~`) or goes deeper."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and os.sep == "/"


def build_trainer(
    args: DeftLlavaFinetuneArguments, training_args: TrainingArguments, callbacks=None
) -> DeftLlavaTrainer:
    """Model, processor(s), dataset, collator and `DeftLlavaTrainer` for one run (nothing trained yet)."""
    training_args.remove_unused_columns = False  # the collator needs the records as they are
    if training_args.dataloader_pin_memory and not torch.cuda.is_available():
        # pinned memory only helps copies to an accelerator; on CPU torch warns that it is unused, every run
        training_args.dataloader_pin_memory = False
    # activation checkpointing: no kwargs means non-reentrant in every supported transformers (the feedback pass
    # needs it); DeftLlavaTrainer refuses reentrant checkpointing with feedback on
    set_seed(training_args.seed)  # LoRA initialisation is part of the run: same seed, same weights

    if os.path.exists(args.model_name_or_path) or not _looks_like_a_hub_id(args.model_name_or_path):
        check_readable_folder(args.model_name_or_path, "--model_name_or_path")
        if not os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
            raise ValueError(
                f"--model_name_or_path {args.model_name_or_path!r} is not a model folder: no config.json"
            )
        with open(os.path.join(args.model_name_or_path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if (
            model_type != "deft_llava"
        ):  # a stock llava folder would train with DeFT off and fresh DeFT weights
            raise ValueError(
                f"--model_name_or_path {args.model_name_or_path!r} holds a {model_type!r} model, not a DeFT-LLaVA "
                "folder: convert it first (python -m modeling_deft_llava.commands.convert "
                f"{args.model_name_or_path} CONVERTED_FOLDER), then train CONVERTED_FOLDER"
            )
    processor = DeftLlavaProcessor.from_pretrained(args.model_name_or_path)
    model = DeftLlavaForConditionalGeneration.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    feedback = feedback_enabled(model, args)
    full_processor = None
    if feedback:
        full_processor = DeftLlavaProcessor.from_pretrained(args.model_name_or_path, use_deft=False)
    elif args.feedback_every_n_steps > 0:
        logger.warning(
            "feedback-guided scoring is off: the model has use_deft=%s, compression_method=%r (needs the DeFT "
            "compressor)",
            model.config.use_deft,
            model.config.compression_method,
        )
    collator = DeftLlavaDataCollator(processor, full_processor, max_length=args.max_length)
    with training_args.main_process_first(desc="loading the training data"):
        dataset = ConversationDataset(
            args.data_path,
            data_format=args.data_format,
            image_folder=args.image_folder,
            length_fn=collator.required_length,
            max_length=args.max_length,
            skip_bad_rows=args.skip_bad_rows,
        )
    logger.info("training data: %s, %d rows, layout %s", args.data_path, len(dataset), dataset.layout)

    model = prepare_model_for_finetuning(
        model,
        use_lora=args.use_lora,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_target_modules=args.lora_target_list,
        train_deft_modules=args.train_deft_modules,
        train_projector=args.train_projector,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return DeftLlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        feedback_every_n_steps=args.feedback_every_n_steps if feedback else 0,
    )


def _listing(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def check_output_folders(args: DeftLlavaFinetuneArguments, training_args: TrainingArguments) -> None:
    """Refuse to start a run whose `output_dir` (or `merge_output_dir`) holds something, unless it continues the
    run there (`--resume`, `--resume_from_checkpoint`) or replaces it (`--overwrite_output_dir`). Read-only, so
    every process takes the same decision."""
    if args.overwrite_output_dir or args.resume or training_args.resume_from_checkpoint:
        return
    for flag, folder in (
        ("output_dir", training_args.output_dir),
        ("merge_output_dir", args.merge_output_dir),
    ):
        names = _listing(folder) if folder else []
        if names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(
                f"--{flag} {folder!r} is not empty ({shown}): pass --resume true to continue the run in it, or "
                "--overwrite_output_dir true to start a new run there (deleting what it holds)"
            )


def _clear(folder: str) -> None:
    """Delete what `folder` holds, each entry through trash (a kill part-way leaves whole entries)."""
    for name in _listing(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            remove_tree(path)
        else:
            os.unlink(path)
    if os.path.isdir(folder):
        logger.warning("--overwrite_output_dir: deleted the previous contents of %s", folder)


def train(
    args: DeftLlavaFinetuneArguments, training_args: TrainingArguments, callbacks=None
) -> DeftLlavaTrainer:
    """Run one fine-tuning: train, save the adapter, DeFT modules and processor to `output_dir`, optionally
    merge into `merge_output_dir`. Returns the trainer (its `state.log_history` holds the logged losses).

    `output_dir` must be empty unless resuming or `overwrite_output_dir` (`check_output_folders`). Resuming first
    repairs what a killed run left (`recover_output_dir`), continues from the newest complete checkpoint, and
    changes nothing when that checkpoint is already at the last step and the final save is complete.

    Raises:
        RuntimeError: another run is writing into the same `output_dir` (`utilities.atomic_write.run_lock`).
    """
    _setup_logging(training_args)
    main_process = training_args.process_index == 0
    with run_lock(training_args.output_dir) if main_process else nullcontext():
        return _train(args, training_args, callbacks)


def _train(args, training_args, callbacks) -> DeftLlavaTrainer:
    check_output_folders(args, training_args)
    with training_args.main_process_first(desc="preparing output_dir"):
        if training_args.process_index == 0:
            if args.overwrite_output_dir:
                _clear(training_args.output_dir)
                if args.merge_output_dir:
                    _clear(args.merge_output_dir)
            elif args.resume:
                recover_output_dir(training_args.output_dir)
    resume_from = training_args.resume_from_checkpoint
    if args.resume:
        resume_from = last_complete_checkpoint(training_args.output_dir)
        unmarked = unmarked_checkpoints(training_args.output_dir)
        if resume_from is None and unmarked:  # starting over would replace them: let the user decide
            raise ValueError(
                f"--resume: {training_args.output_dir!r} holds no complete checkpoint, only {unmarked} without a "
                "matching save_complete.json (half-written or half-deleted, or written by an older version); pass "
                "--resume_from_checkpoint <folder> to continue from one of them, or --overwrite_output_dir true "
                "(without --resume) to start over"
            )
        if resume_from is None:
            logger.warning(
                "--resume: no complete checkpoint in %s; starting from scratch", training_args.output_dir
            )
        else:
            logger.info("resuming from %s", resume_from)
    trainer = build_trainer(args, training_args, callbacks)
    trainer.train(resume_from_checkpoint=resume_from)
    unchanged = trainer.finished_before and final_save_complete(training_args.output_dir)
    if unchanged:
        logger.info("%s already holds the finished run: nothing was changed", training_args.output_dir)
    else:
        trainer.save_model()  # adapter (LoRA + modules_to_save) and processor in output_dir
    trainer.accelerator.wait_for_everyone()
    if args.merge_output_dir and trainer.is_world_process_zero():
        if unchanged and _listing(args.merge_output_dir):
            logger.info("%s already holds the merged model: left as it is", args.merge_output_dir)
        else:
            folder = merge_and_export(
                training_args.output_dir,
                args.merge_output_dir,
                base_model=args.model_name_or_path,
                overwrite=bool(_listing(args.merge_output_dir)),  # allowed by check_output_folders
            )
            logger.info("merged model written to %s", folder)
    return trainer


def resume_command(argv: list[str]) -> str:
    """The command line that continues the run of `argv`: the same flags with `--resume true`, without the
    flags that would start over (`--overwrite_output_dir`) or pin another checkpoint (`--resume_from_checkpoint`)."""
    dropped = ("--overwrite_output_dir", "--resume_from_checkpoint", "--resume")
    kept, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in dropped:
            takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        kept.append(argv[i])
        i += 1
    return shlex.join(["python", "-m", "modeling_deft_llava.training.train", *kept, "--resume", "true"])


def interruption_message(output_dir: str, argv: list[str]) -> str:
    """What a Ctrl-C tells the user: the checkpoint the run can continue from, and the command that does."""
    checkpoint = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    where = (
        f"the last complete checkpoint is {checkpoint}"
        if checkpoint
        else "no checkpoint was saved yet (one every --save_steps steps): resuming starts from step 0"
    )
    return f"interrupted: {where}; to continue, run\n  {resume_command(argv)}"


def main(argv: list[str] | None = None) -> None:
    """The command: a user's mistake (a wrong path, a bad data row, a non-empty output_dir) is one `error:`
    line and exit status 2; Ctrl-C names the checkpoint to continue from and the command (exit status 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    finetune_args, training_args = parse_args(argv)
    try:
        train(finetune_args, training_args)
    except KeyboardInterrupt:
        if training_args.process_index == 0:
            print(interruption_message(training_args.output_dir, argv), file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
