"""Stage 3 of the digits benchmark: train the DeFT modules with feedback-guided scoring.

    python -m benchmarks.digits.train_deft [--base checkpoints/digits-llava-base] [--retention 0.25] \
        [--steps 600] [--semantic-dim 128] [--saliency-hidden-dim 64] [--out checkpoints/digits-deft-llava]
    python -m benchmarks.digits.train_deft --task dense   # -> checkpoints/digits-dense-deft-llava
    python -m benchmarks.digits.train_deft --task video   # -> checkpoints/digits-video-deft-llava (`train_video`)

1. Writes training-split canvases as PNG files and a LLaVA conversation JSONL (`_work/deft_data/`).
2. Converts the all-token base model into a DeFT-LLaVA folder (`modeling_deft_llava.commands.convert`; fresh DeFT
   modules, `use_deft=True`, the given retention ratio, `fast` mode).
3. Trains with the project's training entry point (`modeling_deft_llava.training.train`, the Trainer path):
   LoRA off, projector and backbone frozen, DeFT modules trained; every step a full-token pass gives the
   task-loss gradient for the feedback score, and the total loss is lm + rtd + feedback (training/README.md).
4. Writes the model, the processor and a model card to `--out`.

The backbone is frozen, so accuracy with all tokens is unchanged; what training changes is which tokens DeFT
keeps. One DeFT checkpoint serves every budget: the scorer ranks tokens, the budget only sets k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from modeling_deft_llava.commands.convert import convert
from modeling_deft_llava.configuration.deft_settings import DEFT_RECIPE, RANKING_LOSSES
from modeling_deft_llava.utilities.process_state import restores_process_state

from .common import atomic_write_json
from .data import user_text
from .tasks import TASKS

TRAIN_SEED = 777  # training canvases for stage 3 (disjoint source images from the held-out split)


def write_training_data(folder: str, num_samples: int, make_split) -> str:
    """PNG canvases + `train.jsonl` (LLaVA conversations) from the training split of a task (`make_split`);
    returns the JSONL path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train.jsonl")
    samples = make_split("train", num_samples, seed=TRAIN_SEED)
    with open(path + ".tmp", "w") as f:
        for i, sample in enumerate(samples):
            name = f"canvas_{i:05d}.png"
            sample.pil_image().save(os.path.join(folder, name))
            row = {
                "image": name,
                "conversations": [
                    {"from": "human", "value": user_text(sample.question)},
                    {"from": "gpt", "value": sample.answer},
                ],
            }
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def scorer_settings(args) -> dict:
    """The scorer's config fields from the command line (defaults: `DEFT_RECIPE`)."""
    components = [c for c in args.score_components.split(",") if c]
    return {
        "deft_question_aware": args.question_aware,
        "deft_position_aware": args.position_aware,
        "deft_ranking_loss": args.ranking_loss,
        "deft_score_components": components or None,
    }


def learned_mixture(model) -> dict:
    """The score mixture `beta = softmax(mixture_logits)` (components: semantic, feedback, group), over all
    three (training) and over semantic + group (inference: the feedback score needs the task loss)."""
    import torch

    logits = [v for k, v in model.state_dict().items() if k.endswith("mixture_logits")]
    if len(logits) != 1:
        return {"note": f"{len(logits)} mixture_logits tensors found"}
    raw = logits[0].detach().float()
    return {
        "mixture_logits": raw.tolist(),
        "beta_training": dict(zip(("semantic", "feedback", "group"), torch.softmax(raw, 0).tolist())),
        "beta_inference": dict(zip(("semantic", "group"), torch.softmax(raw[[0, 2]], 0).tolist())),
    }


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="easy")
    parser.add_argument("--base", default=None, help="all-token LLaVA (default: the task's, tasks.py)")
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--semantic-dim",
        type=int,
        default=128,
        help="width of DeFT's semantic space (the seed's 512 is 4x this model's 128-wide features)",
    )
    parser.add_argument(
        "--saliency-hidden-dim", type=int, default=64, help="hidden width of the saliency MLP"
    )
    parser.add_argument(
        "--question-aware",
        action=argparse.BooleanOptionalAction,
        default=DEFT_RECIPE["deft_question_aware"],
        help="deft_question_aware (the recipe: on; --no-question-aware for the seed's question-blind scorer)",
    )
    parser.add_argument(
        "--position-aware",
        action=argparse.BooleanOptionalAction,
        default=DEFT_RECIPE["deft_position_aware"],
        help="deft_position_aware (the recipe: on)",
    )
    parser.add_argument(
        "--ranking-loss",
        choices=RANKING_LOSSES,
        default=DEFT_RECIPE["deft_ranking_loss"],
        help="deft_ranking_loss (the recipe: listnet; mse is the seed's)",
    )
    parser.add_argument(
        "--score-components",
        default=",".join(DEFT_RECIPE.get("deft_score_components") or ()),
        help="deft_score_components, comma-separated (empty: every component present, the seed's mixture)",
    )
    parser.add_argument("--out", default=None, help="default: the task's DeFT checkpoint (tasks.py)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--feedback-every-n-steps",
        type=int,
        default=1,
        help="full-token feedback pass every n optimizer steps (0: feedback off, the ablation)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    args.base, args.out = args.base or task.checkpoint, args.out or task.deft_checkpoint
    if not os.path.isfile(os.path.join(args.base, "config.json")):
        parser.error(f"base checkpoint {args.base!r} not found: run benchmarks.digits.train_base first")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(f"{args.out!r} exists; pass --overwrite to replace it")
    start = time.time()
    if task.modality == "video":
        train_video(args, task, argv, start)
        return
    data = write_training_data(task.work("deft_data"), args.samples, task.make_split)
    init = task.work("deft_init")
    convert(
        args.base,
        init,
        overwrite=True,
        use_deft=True,
        deft_retention_ratio=args.retention,
        deft_semantic_dim=args.semantic_dim,
        deft_saliency_hidden_dim=args.saliency_hidden_dim,
        **scorer_settings(args),
    )
    run = task.work("deft_run")
    shutil.rmtree(run, ignore_errors=True)

    from modeling_deft_llava.training.train import parse_args, train

    finetune_args, training_args = parse_args(
        [
            "--model_name_or_path", init,
            "--data_path", data,
            "--use_lora", "false",
            "--train_projector", "false",
            "--train_deft_modules", "true",
            "--feedback_every_n_steps", str(args.feedback_every_n_steps),
            "--output_dir", run,
            "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch_size),
            "--learning_rate", str(args.lr),
            "--lr_scheduler_type", "cosine",
            "--warmup_steps", str(max(1, args.steps // 20)),
            "--max_grad_norm", "1.0",
            "--logging_steps", "25",
            "--save_steps", str(args.steps),
            "--seed", str(args.seed),
            "--report_to", "none",
            "--dataloader_num_workers", "0",
        ]
    )  # fmt: skip
    trainer = train(finetune_args, training_args)
    staging = args.out + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model = trainer.model
    model.save_pretrained(staging)
    trainer.processing_class.save_pretrained(staging)
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    atomic_write_json(
        os.path.join(staging, "train_deft_log.json"),
        {
            "command": "python -m benchmarks.digits.train_deft "
            + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "task": args.task,
            "base": args.base,
            "retention": args.retention,
            "steps": args.steps,
            "samples": args.samples,
            "train_seed": TRAIN_SEED,
            "seed": args.seed,
            "semantic_dim": args.semantic_dim,
            "saliency_hidden_dim": args.saliency_hidden_dim,
            "feedback_every_n_steps": args.feedback_every_n_steps,
            "scorer": scorer_settings(args),
            "learned_mixture": learned_mixture(model),
            "wall_time_s": time.time() - start,
            "log": log,
        },
    )
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(f"wrote {args.out} in {time.time() - start:.0f} s; last log: {log[-1] if log else None}")


def train_video(args, task, argv, start: float) -> None:
    """The video task: the same recipe by hand (`training/train.py` reads image conversations only). DeFT
    modules alone are trained (backbone frozen, so the all-token accuracy is unchanged), every step with a
    full-token feedback pass; loss = lm + rtd + feedback, as the trainer's (`DeftLlavaModel` computes it)."""
    import math

    import torch
    from modeling_deft_llava.training.trainer import feedback_gradients

    from modeling_deft_llava import DeftLlavaForConditionalGeneration

    from .common import DigitsCollator, build_video_processor

    torch.manual_seed(args.seed)
    settings = dict(
        use_deft=True,
        deft_retention_ratio=args.retention,
        deft_semantic_dim=args.semantic_dim,
        deft_saliency_hidden_dim=args.saliency_hidden_dim,
        **scorer_settings(args),
    )
    model = DeftLlavaForConditionalGeneration.from_pretrained(args.base, **settings)
    processor = build_video_processor(task.words, use_deft=True, deft_retention_ratio=args.retention)
    full_processor = build_video_processor(task.words, use_deft=False)
    trained = [p for n, p in model.named_parameters() if ".deft." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(".deft." in n)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_at(step):  # linear warmup + cosine, as the image recipe's Trainer schedule
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    samples = task.make_split("train", args.steps * args.batch_size, seed=TRAIN_SEED)
    collate, collate_full = DigitsCollator(processor), DigitsCollator(full_processor)
    model.train()
    log = []
    for step in range(args.steps):
        chunk = samples[step * args.batch_size : (step + 1) * args.batch_size]
        grads = None
        if args.feedback_every_n_steps and step % args.feedback_every_n_steps == 0:
            full = collate_full(chunk)
            grads = feedback_gradients(model, full, pixel_values_videos=full["pixel_values_videos"])
        out = model(**collate(chunk), deft_token_gradients=grads, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        entry = {"step": step + 1, "loss": out.loss.item(), "lm_loss": out.lm_loss.item()}
        for name in ("rtd_loss", "feedback_loss"):
            value = getattr(out, name, None)
            entry[name] = None if value is None else value.item()
        log.append(entry)
        if (step + 1) % 10 == 0 or step == 0:
            print(entry, f"{time.time() - start:.0f} s", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    staging = args.out + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    atomic_write_json(
        os.path.join(staging, "train_deft_log.json"),
        {
            "command": "python -m benchmarks.digits.train_deft "
            + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "task": args.task,
            "base": args.base,
            "recipe": train_video.__doc__,
            "retention": args.retention,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "samples": args.steps * args.batch_size,
            "train_seed": TRAIN_SEED,
            "seed": args.seed,
            "semantic_dim": args.semantic_dim,
            "saliency_hidden_dim": args.saliency_hidden_dim,
            "feedback_every_n_steps": args.feedback_every_n_steps,
            "scorer": scorer_settings(args),
            "learned_mixture": learned_mixture(model),
            "wall_time_s": time.time() - start,
            "torch_threads": torch.get_num_threads(),
            "log": log,
        },
    )
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    print(f"wrote {args.out} in {time.time() - start:.0f} s; last log: {log[-1] if log else None}")


if __name__ == "__main__":
    main()
