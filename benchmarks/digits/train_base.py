"""Stage 2: end-to-end training of the all-token digits LLaVA, then held-out evaluation and saving.

Loads the stage-1 vision tower (run `pretrain_vision` first, same --seed), trains the whole
`LlavaForConditionalGeneration` with `transformers.Trainer` on the answer token (+ `</s>`), evaluates greedy
`generate` exact match on held-out queries (test split: source images never seen in training) and saves
model + processor + train_log.json to checkpoints/digits-llava-base/.

    .venv/bin/python -m benchmarks.digits.train_base --steps 3000 --seed 0
    .venv/bin/python -m benchmarks.digits.train_base --task dense   # -> checkpoints/digits-dense-llava-base
    .venv/bin/python -m benchmarks.digits.train_base --task video   # warm start from checkpoints/digits-llava-base
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch
from modeling_deft_llava.utilities.process_state import restores_process_state
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor, Trainer, TrainingArguments

from .common import (
    ROPE_THETA,
    TEST_SEED,
    DigitsCollator,
    atomic_write_json,
    build_model,
    build_processor,
    build_video_processor,
    evaluate_generate,
    video_model_from_image_checkpoint,
)
from .data import INK_THRESHOLD, SCALE, source_indices
from .tasks import TASKS


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files if f)


@restores_process_state
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0, help="model init + Trainer seed (same as stage 1)")
    ap.add_argument("--data-seed", type=int, default=202, help="seed of the stage-2 training samples")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--task", choices=sorted(TASKS), default="easy")
    ap.add_argument(
        "--stage1",
        default=None,
        help="default: the task's stage-1 path (tasks.py; for video the image checkpoint it warm-starts from)",
    )
    ap.add_argument("--out", default=None, help="default: the task's checkpoint folder (tasks.py)")
    ap.add_argument(
        "--init-from",
        default=None,
        help="continue stage 2 from a saved checkpoint folder (its train_log.json is kept as a previous phase)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower's weights fixed")
    ap.add_argument(
        "--rope-theta", type=float, default=ROPE_THETA, help="RoPE base of the decoder (see common.py)"
    )
    ap.add_argument("--text-heads", type=int, default=4, help="attention heads of the decoder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    args.stage1, args.out = args.stage1 or task.stage1, args.out or task.checkpoint
    command = shlex.join(
        [".venv/bin/python", "-m", "benchmarks.digits.train_base", *(sys.argv[1:] if argv is None else argv)]
    )

    torch.manual_seed(args.seed)
    previous = []
    if args.init_from:
        if task.modality == "video":
            from modeling_deft_llava import DeftLlavaForConditionalGeneration as model_class
            from modeling_deft_llava import DeftLlavaProcessor as processor_class
        else:
            model_class, processor_class = LlavaForConditionalGeneration, LlavaProcessor
        processor = processor_class.from_pretrained(args.init_from)
        model = model_class.from_pretrained(args.init_from)
        with open(os.path.join(args.init_from, "train_log.json")) as f:
            prev_log = json.load(f)
        stage1 = prev_log["stage1"]
        previous = prev_log.get("previous_stage2_phases", []) + [prev_log["stage2"]]
        source = f"continued from {args.init_from}"
    elif task.modality == "video":  # warm start from the easy task's whole model (its tower reads the frames)
        processor = build_video_processor(task.words)
        model = video_model_from_image_checkpoint(args.stage1, processor)
        with open(os.path.join(args.stage1, "train_log.json")) as f:
            base_log = json.load(f)
        stage1 = {
            "warm_start_from": args.stage1,
            "wall_time_s": base_log["total_train_wall_time_s"],
            "command": "; ".join(base_log["commands"]),
        }
        source = f"warm start from {args.stage1} (vocabulary grown to {len(processor.tokenizer)})"
    else:
        processor = build_processor(task.words)
        model = build_model(processor, seed=args.seed, rope_theta=args.rope_theta, text_heads=args.text_heads)
        missing, unexpected = model.model.vision_tower.load_state_dict(load_file(args.stage1), strict=True)
        assert not missing and not unexpected
        with open(os.path.splitext(args.stage1)[0] + ".json") as f:
            stage1 = json.load(f)
        source = f"stage-1 tower from {args.stage1}"
    if args.freeze_vision:  # the tower already reads the frames (warm start): train projector + decoder only
        model.model.vision_tower.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}; {source}")

    train_data = task.make_split("train", args.steps * args.batch_size, seed=args.data_seed)
    targs = TrainingArguments(
        output_dir=task.work("trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_data,
        data_collator=DigitsCollator(processor, train=True),
    )
    t0 = time.time()
    result = trainer.train()
    train_time = time.time() - t0

    model.config.use_cache = True
    model.config.text_config.use_cache = True
    test = task.make_split("test", args.eval_samples, seed=TEST_SEED)
    t1 = time.time()
    ev = evaluate_generate(
        model, processor, test, desc="held-out generate", max_new_tokens=task.max_answer_tokens + 1
    )
    eval_time = time.time() - t1
    print(
        f"held-out exact match: {ev['correct']}/{ev['n']} = {ev['accuracy']:.4f}, Wilson95 {ev['wilson95']}"
    )

    os.makedirs(args.out, exist_ok=True)
    model.config.use_cache = True  # Trainer turns the cache off for training; generation wants it
    model.config.text_config.use_cache = True
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    size = dir_size(args.out)
    by_kind = {
        kind: [p == s.answer for p, s in zip(ev["predictions"], test) if s.kind == kind]
        for kind in task.kinds
    }
    log = {
        "task": args.task,
        "heldout_accuracy": ev["accuracy"],
        "heldout_accuracy_by_kind": {k: sum(v) / max(len(v), 1) for k, v in by_kind.items()},
        "heldout_correct": ev["correct"],
        "heldout_samples": ev["n"],
        "heldout_wilson95": ev["wilson95"],
        "heldout_split": {"split": "test", "seed": TEST_SEED, "source_images": len(source_indices("test"))},
        "train_source_images": len(source_indices("train")),
        "eval": f"greedy generate, max_new_tokens={task.max_answer_tokens + 1}, decoded answer (special tokens "
        "skipped) == target answer",
        "stage1": {k: v for k, v in stage1.items() if k != "log"},
        "stage2": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "train_samples": args.steps * args.batch_size,
            "lr": args.lr,
            "schedule": f"linear warmup {args.warmup_steps} steps + cosine decay",
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "seed": args.seed,
            "data_seed": args.data_seed,
            "freeze_vision": args.freeze_vision,
            "final_train_loss": result.training_loss,
            "wall_time_s": round(train_time, 1),
            "log_history": trainer.state.log_history,
            "command": command,
        },
        "previous_stage2_phases": previous,
        "stage2_total_steps": args.steps + sum(p["steps"] for p in previous),
        "total_train_wall_time_s": round(
            train_time + stage1["wall_time_s"] + sum(p["wall_time_s"] for p in previous), 1
        ),
        "eval_wall_time_s": round(eval_time, 1),
        "commands": [
            stage1["command"]
            if stage1["command"].startswith(".venv/bin/")
            else stage1["command"].replace("python -m", ".venv/bin/python -m", 1)
        ]
        + [p["command"] for p in previous]
        + [command],
        "parameters": n_params,
        "checkpoint_bytes_before_log": size,
        "data": {"canvas": 64, "digit_scale": SCALE, "ink_threshold": INK_THRESHOLD},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(os.path.join(args.out, "train_log.json"), log)
    print(f"saved to {args.out} ({size / 1e6:.2f} MB)")
    return log


if __name__ == "__main__":
    main()
