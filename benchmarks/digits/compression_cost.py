"""CPU time of the main job's compression step against its prefills, steadier than wall time on a shared machine.

    python -m benchmarks.digits.compression_cost [--checkpoint checkpoints/digits-deft-llava] [--rounds 3]

The main job's batch (8 held-out questions, the shipped checkpoint), one torch thread: process CPU time of
the active method's compression step on the batch's projected rows (`main_job.compression_step`: DeFT's
question-aware scoring and top-k), of the
compressed prefill and of the full-token prefill. Each is timed `--calls` times per round (after a warm-up),
the rounds interleave the three, and the minimum over all calls is reported (on a loaded machine, the
minimum is the least disturbed reading). Process CPU time counts the work of this process only, not the time
it waits for a core.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

from .common import TEST_SEED
from .data import chat_messages, make_split
from .main_job import compression_step

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints", "digits-deft-llava")


def cpu_seconds(fn, calls: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return times


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.normpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15, help="timed calls of each per round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error(f"--rounds and --calls must be >= 1, got {args.rounds} and {args.calls}")
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        parser.error(f"checkpoint {args.checkpoint!r} not found")
    torch.set_num_threads(1)
    model = DeftLlavaForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    processor = DeftLlavaProcessor.from_pretrained(args.checkpoint)
    full_processor = DeftLlavaProcessor.from_pretrained(args.checkpoint, use_deft=False)
    samples = make_split("test", 8, seed=TEST_SEED)
    prompts = [
        processor.apply_chat_template(chat_messages(s.question), add_generation_prompt=True) for s in samples
    ]
    images = [s.image for s in samples]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    full_inputs = full_processor(images=images, text=prompts, padding=True, return_tensors="pt")
    inner = model.model
    times = {"compression step": [], "compressed prefill": [], "full-token prefill": []}
    step = compression_step(model, inputs)
    with torch.no_grad():
        for _ in range(args.rounds):
            times["compression step"] += cpu_seconds(step, args.calls)
            times["compressed prefill"] += cpu_seconds(
                lambda: model(**inputs, use_cache=True, logits_to_keep=1), args.calls
            )
            with inner.compression_disabled():
                times["full-token prefill"] += cpu_seconds(
                    lambda: model(**full_inputs, use_cache=True, logits_to_keep=1), args.calls
                )
    best = {name: min(values) for name, values in times.items()}
    for name, value in best.items():
        print(f"{name}: {value * 1000:.2f} ms (minimum of {len(times[name])} calls, process CPU, 1 thread)")
    full = best["full-token prefill"]
    print(
        f"{model.config.compression_method} compression step = {best['compression step'] / full:.1%} of the "
        f"full-token prefill; compressed prefill saves {1 - best['compressed prefill'] / full:.0%}"
    )


if __name__ == "__main__":
    main()
