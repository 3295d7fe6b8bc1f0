"""Stage 1: pre-train the CLIP vision tower of the digits LLaVA on per-patch labels.

Every 8x8 patch of a training-split canvas is labelled with the digit whose ink it holds (ink mass >= the
data module's INK_THRESHOLD) or "background" (no ink at all): 11 classes. The side (left/right) is
deliberately NOT labelled, so the digit identity stays local to the ink tokens. Patches with a little ink
below the threshold are ignored. A LayerNorm + Linear patch head reads the hidden states the LLaVA will
use (`vision_feature_layer`, CLS dropped); the head is thrown away afterwards and only the vision tower
weights are saved (to benchmarks/digits/_work/, git-ignored) for stage 2.

    .venv/bin/python -m benchmarks.digits.pretrain_vision --steps 3000 --seed 0
    .venv/bin/python -m benchmarks.digits.pretrain_vision --task dense --init-vision checkpoints/digits-llava-base

`--task dense` trains on dense canvases (`dense.py`: a patch holding ink of two different digits is ignored);
`--init-vision FOLDER` starts from the vision tower of a saved LLaVA (a warm start, recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from modeling_deft_llava.utilities.process_state import restores_process_state
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

from .common import (
    SELECT_STRATEGY,
    VISION_FEATURE_LAYER,
    build_model,
    build_processor,
    pixel_values,
)
from .tasks import TASKS


def patch_features(vision_tower, pixels: torch.Tensor) -> torch.Tensor:
    out = vision_tower(pixels, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[VISION_FEATURE_LAYER]
    return feats[:, 1:] if SELECT_STRATEGY == "default" else feats


@restores_process_state
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="model init seed (stage 2 must use the same)")
    ap.add_argument("--data-seed", type=int, default=101, help="seed of the stage-1 training canvases")
    ap.add_argument("--task", choices=sorted(TASKS), default="easy")
    ap.add_argument("--out", default=None, help="default: the task's stage-1 path (tasks.py)")
    ap.add_argument("--init-vision", default=None, help="start from the vision tower of this LLaVA folder")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    args.out = args.out or task.stage1

    torch.manual_seed(args.seed)
    processor = build_processor(task.words)
    model = build_model(processor, seed=args.seed)
    tower = model.model.vision_tower
    if args.init_vision:
        warm = LlavaForConditionalGeneration.from_pretrained(args.init_vision).model.vision_tower
        tower.load_state_dict(warm.state_dict(), strict=True)
    hidden = tower.config.hidden_size
    head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 11))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    data = task.make_split("train", args.steps * args.batch_size, seed=args.data_seed)
    tower.train()
    head.train()
    t0 = time.time()
    running_loss, running_acc = 0.0, 0.0
    log = []
    bar = tqdm(range(args.steps), desc="stage1 vision")
    for step in bar:
        samples = data[step * args.batch_size : (step + 1) * args.batch_size]
        pixels = pixel_values(processor, samples)
        labels = torch.from_numpy(np.stack([s.patch_labels() for s in samples]))  # (B, 64)
        logits = head(patch_features(tower, pixels))
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        valid = labels != -100
        ink = valid & (labels != 10)
        acc = (logits.argmax(-1)[ink] == labels[ink]).float().mean().item()
        running_loss = 0.98 * running_loss + 0.02 * loss.item() if step else loss.item()
        running_acc = 0.98 * running_acc + 0.02 * acc if step else acc
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{running_loss:.3f}", ink_acc=f"{running_acc:.3f}")
        if step % 250 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": running_loss, "ink_patch_acc": running_acc})
    train_time = time.time() - t0

    # held-out patch accuracy (test split, never trained on) to check the stage worked
    tower.eval()
    head.eval()
    correct_ink = total_ink = correct_bg = total_bg = 0
    with torch.no_grad():
        test = task.make_split("test", 500, seed=4321)[:]
        for start in range(0, len(test), 100):
            chunk = test[start : start + 100]
            labels = torch.from_numpy(np.stack([s.patch_labels() for s in chunk]))
            pred = head(patch_features(tower, pixel_values(processor, chunk))).argmax(-1)
            ink = (labels != -100) & (labels != 10)
            bg = labels == 10
            correct_ink += (pred[ink] == labels[ink]).sum().item()
            total_ink += ink.sum().item()
            correct_bg += (pred[bg] == 10).sum().item()
            total_bg += bg.sum().item()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    save_file(state, args.out, metadata={"seed": str(args.seed), "steps": str(args.steps)})
    summary = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "task": args.task,
        "init_vision": args.init_vision,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(train_time, 1),
        "heldout_ink_patch_accuracy": correct_ink / max(total_ink, 1),
        "heldout_ink_patches": total_ink,
        "heldout_background_patch_accuracy": correct_bg / max(total_bg, 1),
        "log": log,
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.digits.pretrain_vision"])
        + (" " + " ".join(sys.argv[1:]) if argv is None else " " + " ".join(argv)),
        "out": os.path.relpath(args.out),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
