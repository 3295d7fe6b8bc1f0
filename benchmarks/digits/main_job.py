"""The main job: compressed DeFT-LLaVA inference on real handwritten-digit canvases.

    python -m benchmarks.digits.main_job [--checkpoint checkpoints/digits-deft-llava] [--n 8] [--out outputs/main_job.png]

Loads the shipped checkpoint (a small LLaVA trained on the two-digit task, with DeFT modules trained by
feedback-guided scoring), asks held-out questions ("what digit is on the left ?") about canvases built from
scikit-learn's real handwritten digits, and prints each answer next to the truth, the visual tokens kept,
and the prefill time with compression on and off (same weights, median of repeated runs), and what the
compression step itself costs (the method's `compress_features` and `compress_with_prompt` on the batch's
projected rows: for DeFT, its question-aware scoring and top-k) as a share of the full-token prefill. Writes a PNG that overlays the kept tokens on each
canvas.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from modeling_deft_llava.commands.visualize import (
    paired_prefill_runs,
    processed_image,
    save_overlays,
    saving_text,
)
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.compressors.compression_method import PromptBatch

from .common import TEST_SEED
from .data import chat_messages, make_split

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints", "digits-deft-llava")


def compression_step(model, inputs):
    """A function that runs the active method's compression of `inputs`' images as the prefill does:
    `compress_features` on all N projected rows, then `compress_with_prompt` with the prompt (question-aware
    DeFT, CDPruner and Recoverable score and select there). The vision tower is not in it."""
    inner = model.model
    method = inner.active_method
    pixel_values = inputs["pixel_values"]
    with torch.no_grad(), inner.compression_disabled():
        features = inner.get_image_features(pixel_values)  # all N projected rows per image
    visual = inner._visual_batch("image", inner._patch_grid(pixel_values), 1, None)
    prompt = None
    if method.acts_in("compress_with_prompt"):
        ids = inputs["input_ids"]
        placeholders = ids == model.config.image_token_index
        with torch.no_grad():
            embeds = inner.get_input_embeddings()(ids)
        text = inputs["attention_mask"].bool() & ~placeholders
        prompt = PromptBatch(
            embeds,
            placeholders,
            text,
            ids.shape[1],
            "image",
            num_kept=visual.num_kept,
            input_embeddings=inner.get_input_embeddings(),
            projector=inner.multi_modal_projector,
        )

    def run():
        with torch.no_grad():
            out = method.compress_features(features, visual)
            if prompt is not None:
                method.compress_with_prompt(out, prompt)

    return run


def compression_seconds(model, inputs, repeats: int) -> float:
    """Median time of the active method's compression step (`compression_step`), after one warm-up."""
    step = compression_step(model, inputs)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) if repeats else times[0]


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.normpath(DEFAULT_CHECKPOINT))
    parser.add_argument("--n", type=int, default=8, help="held-out questions to answer")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefill runs (median)")
    parser.add_argument("--out", default="outputs/main_job_kept_tokens.png")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        parser.error(
            f"checkpoint {args.checkpoint!r} not found (reproduce it: see benchmarks/digits/README.md)"
        )
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    torch.manual_seed(0)
    model = DeftLlavaForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    processor = DeftLlavaProcessor.from_pretrained(args.checkpoint)
    full_processor = DeftLlavaProcessor.from_pretrained(args.checkpoint, use_deft=False)
    samples = make_split("test", args.n, seed=TEST_SEED)
    prompts = [
        processor.apply_chat_template(chat_messages(s.question), add_generation_prompt=True) for s in samples
    ]
    images = [s.image for s in samples]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answers = processor.tokenizer.batch_decode(
        generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    full_inputs = full_processor(images=images, text=prompts, padding=True, return_tensors="pt")
    on_runs, off_runs = paired_prefill_runs(model, inputs, full_inputs, args.repeats)
    on, off = statistics.median(on_runs), statistics.median(off_runs)
    scoring = compression_seconds(model, inputs, args.repeats)
    grid = model.model._patch_grid(inputs["pixel_values"])
    n_tokens = grid[0] * grid[1]
    print(
        f"checkpoint {args.checkpoint}: method {model.config.compression_method}, "
        f"retention {model.config.deft_retention_ratio}, mode {model.config.deft_inference_mode}"
    )
    correct = 0
    results = []
    for sample, answer, kept in zip(samples, answers, out.kept_indices):
        answer = answer.strip()
        correct += answer == sample.answer
        print(
            f"  {sample.question:30} -> {answer!r:5} (truth {sample.answer!r}) kept {len(kept)}/{n_tokens} visual tokens"
        )
        results.append(
            {
                "answer": f"{sample.question.split()[-2]}={answer}",
                "kept_indices": kept.tolist(),
                "num_tokens": n_tokens,
                "grid": grid,
                "image": processed_image(processor, sample.pil_image()),
            }
        )
    print(f"{correct}/{len(samples)} correct")
    print(
        f"prefill of the batch: {on * 1000:.1f} ms compressed vs {off * 1000:.1f} ms with all {n_tokens} tokens "
        f"{saving_text(on_runs, off_runs)} (medians of {args.repeats} alternating runs; sequence "
        f"{inputs['input_ids'].shape[1]} vs {full_inputs['input_ids'].shape[1]} tokens)"
    )
    print(
        f"{model.config.compression_method} compression step (scoring + top-k on the {n_tokens} projected rows of "
        f"each image): {scoring * 1000:.1f} ms = {scoring / off:.1%} of the full-token prefill "
        f"(median of {args.repeats}; {torch.get_num_threads()} threads)"
    )
    save_overlays(results, args.out)
    print(f"wrote {args.out} (kept tokens outlined in red, pruned ones dimmed)")


if __name__ == "__main__":
    main()
