"""Accuracy against budget on the video digits task (`video.py`), with prefill time and KV-cache size: one command.

    .venv/bin/python -m benchmarks.digits.evaluate_video --n 500 --threads 1
        # -> benchmarks/results/digits_video_accuracy.{json,png}

Rows (held-out videos of the test split, greedy `generate` unless noted; budgets 50/25/12.5% of the video's
`frames x 64` visual tokens):

* ``full``: every visual token (the all-token video LLaVA, `checkpoints/digits-video-llava-base`).
* ``deft``: DeFT's video mode (one budget over the whole video; temporal group score over
  `deft_group_video_window` frames), the trained DeFT modules of `checkpoints/digits-video-deft-llava`.
* image baselines applied frame by frame (`CompressionMethod.compresses_frames`: the model runs the image
  path on every frame, K = `floor(ratio * 64 + 0.5)` tokens per frame, the same total as the video budget
  here): ``random``, ``uniform`` (uniform token sampling), ``divprune``, ``visionzip``, ``deco`` (25% only: it
  pools to a square grid), ``prunesid``, ``tome``, ``ficoco_v``. Methods that need the prompt or the decoder
  (``recoverable``, ``cdpruner``, ``fastv``, ``ficoco_l``) do not take videos (a ValueError; not measured).
* ``uniform_frames``: uniform frame sampling, all tokens of evenly spaced frames (`uniform_indices` over the
  frames; when the budget is less than one frame, the first K tokens of the middle frame). It is not a
  registered method: it runs through the fixed-subset path below, kept tokens at their original positions.
* validity oracles (fixed-subset path, all-token model): the ink of the digits the answer needs, all ink,
  background only (as many tokens as all ink), and all tokens (cross-check of the path against `generate`).

Fixed-subset path: the all-token model's video features are scattered into the `<video>` placeholders, the
visual tokens not kept are dropped, kept tokens keep their original positions (as the model's own
compression does), and the answer is the argmax of the last position's logits (answers are one token).

Costs (`--cost-samples` videos per row; `costs.prefill_costs`): prefill FLOPs, the visual tokens the language
model saw, median prefill wall time of the batch, and the KV cache it leaves (bytes per video, padding
included). Fixed-subset rows time that path: the vision tower on every frame (a real frame sampler would encode
only the kept frames: an upper bound) and the language model on the kept tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from modeling_deft_llava.configuration.deft_settings import num_kept_tokens
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava.compressors.method_uniform import uniform_indices

from .common import TEST_SEED, DigitsCollator, atomic_write_json
from .costs import kv_cache_bytes, prefill_costs
from .data import wilson_interval
from .evaluate_methods import evaluate_model, load, method_settings, score, spread_by_ratio
from .tasks import TASKS
from .video import TOKENS_PER_FRAME

PER_FRAME_METHODS = ("random", "uniform", "divprune", "visionzip", "deco", "prunesid", "tome", "ficoco_v")
NO_VIDEO_METHODS = ("recoverable", "cdpruner", "fastv", "ficoco_l")
ORACLES = ("oracle_all_tokens", "oracle_asked_ink", "oracle_all_ink", "oracle_background")


def frame_sampling(num_frames: int, num_kept: int) -> np.ndarray:
    """Uniform frame sampling at a budget of `num_kept` tokens: every token of `num_kept // 64` evenly spaced
    frames (`uniform_indices`), or, below one frame, the first `num_kept` tokens of the middle frame."""
    whole = num_kept // TOKENS_PER_FRAME
    if whole == 0:
        frame = int(uniform_indices(num_frames, 1)[0])
        return frame * TOKENS_PER_FRAME + np.arange(num_kept)
    frames = uniform_indices(num_frames, whole).tolist()
    return np.concatenate([f * TOKENS_PER_FRAME + np.arange(TOKENS_PER_FRAME) for f in frames])


def oracle_keep(sample, name: str, rng: np.random.Generator) -> np.ndarray:
    total = sample.num_frames * TOKENS_PER_FRAME
    if name == "oracle_all_tokens":
        return np.arange(total)
    if name == "oracle_asked_ink":
        return sample.ink_tokens("asked")
    if name == "oracle_all_ink":
        return sample.ink_tokens("all")
    if name == "oracle_background":
        bg = sample.background_tokens()
        return np.sort(rng.choice(bg, size=min(len(sample.ink_tokens("all")), len(bg)), replace=False))
    raise ValueError(f"unknown oracle {name!r}; valid: {ORACLES}")


def _subset_inputs(model, batch, keep: list[np.ndarray]):
    """`inputs_embeds`, attention mask and original position ids of `batch` with only video tokens `keep[i]`."""
    input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    video_id = model.config.video_token_index
    with model.model.compression_disabled():
        feats = torch.stack(list(model.model.get_video_features(batch["pixel_values_videos"]).pooler_output))
    embeds = model.get_input_embeddings()(input_ids)
    is_video = input_ids == video_id
    embeds = embeds.masked_scatter(is_video.unsqueeze(-1), feats.to(embeds.dtype))
    rows, positions = [], []
    for i in range(input_ids.shape[0]):
        real = torch.nonzero(attention[i]).squeeze(-1)
        video_pos = torch.nonzero(is_video[i, real]).squeeze(-1)
        kept = torch.ones(len(real), dtype=torch.bool)
        kept[video_pos] = False
        kept[video_pos[torch.as_tensor(np.asarray(keep[i], dtype=np.int64))]] = True
        idx = torch.nonzero(kept).squeeze(-1)
        rows.append(embeds[i, real][idx])
        positions.append(idx)
    length = max(len(r) for r in rows)
    x = embeds.new_zeros(len(rows), length, embeds.shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, positions)):  # left padding
        x[i, length - len(r) :], mask[i, length - len(r) :], pos[i, length - len(r) :] = r, 1, p
    return dict(inputs_embeds=x, attention_mask=mask, position_ids=pos)


@torch.no_grad()
def subset_row(model, processor, samples, keep_of, batch_size: int, cost_samples: int, kinds) -> dict:
    """Answer accuracy with only the video tokens `keep_of(i, sample)` (fixed-subset path), plus its costs."""
    collate = DigitsCollator(processor, train=False)
    tok = processor.tokenizer
    hits, seen = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        keep = [keep_of(start + j, s) for j, s in enumerate(chunk)]
        inputs = _subset_inputs(model, collate(chunk), keep)
        pred = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        answers = [tok(s.answer, add_special_tokens=False)["input_ids"][0] for s in chunk]
        hits += [p == a for p, a in zip(pred, answers)]
        seen += [len(k) for k in keep]
    correct = int(sum(hits))
    out = {
        "accuracy": correct / len(samples),
        "correct": correct,
        "n": len(samples),
        "wilson95": list(wilson_interval(correct, len(samples))),
        "mean_visual_tokens": float(np.mean(seen)),
        "path": "fixed subset (teacher-forced first answer token)",
    }
    kind_of = [s.kind for s in samples]
    out["by_kind"] = {
        k: {
            "accuracy": sum(h for h, kk in zip(hits, kind_of) if kk == k) / max(kind_of.count(k), 1),
            "n": kind_of.count(k),
        }
        for k in kinds
    }
    if cost_samples:
        chunk = samples[:cost_samples]
        batch, keep = collate(chunk), [keep_of(j, s) for j, s in enumerate(chunk)]
        times = []
        for _ in range(4):  # the vision tower on every frame + the language model on the kept tokens
            t = time.perf_counter()
            inputs = _subset_inputs(model, batch, keep)
            res = model(**inputs, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
        out["prefill_s"] = statistics.median(times[1:])
        out["prefill_batch"] = len(chunk)
        out["kv_cache_bytes_per_sample"] = kv_cache_bytes(res.past_key_values) / len(chunk)
        out["lm_seq_len"] = int(inputs["inputs_embeds"].shape[1])
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = results["visual_tokens_full"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for method in results["methods"]:
        pts = sorted(
            (r["kept_tokens"] / total, r["accuracy"])
            for r in results["rows"]
            if r["method"] == method and r.get("accuracy") is not None
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=method, linestyle="--" if method == "deft" else "-")
    full = results["full"]["accuracy"]
    ax.axhline(full, color="k", linestyle="--", label=f"all {total} tokens ({full:.1%})")
    ax.set(xlabel=f"visual tokens kept (share of {total})", ylabel="held-out answer accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Video digits VQA (real handwritten digits, 4 frames)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report(results: dict) -> str:
    """Markdown tables of a results file: accuracy per method and budget (Wilson 95% interval), the costs at
    each budget, the validity oracles."""
    ratios = sorted({r["retention_ratio"] for r in results["rows"]}, reverse=True)
    total = results["visual_tokens_full"]
    full = results["full"]
    by_kind = ", ".join(k + " " + _pct(v["accuracy"]) for k, v in full.get("by_kind", {}).items())
    lo, hi = full["wilson95"]
    lines = [
        f"All {total} tokens: {_pct(full['accuracy'])} [{100 * lo:.0f}, {100 * hi:.0f}] ({by_kind}); "
        f"n = {results['n']} held-out videos.",
        "",
        "| method | " + " | ".join(f"{100 * r:g}% ({int(total * r + 0.5)})" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for method in results["methods"]:
        cells = []
        for ratio in ratios:
            row = next(
                (r for r in results["rows"] if r["method"] == method and r["retention_ratio"] == ratio), None
            )
            if row is None or row.get("accuracy") is None:
                cells.append("n/a")
                continue
            lo, hi = row["wilson95"]
            cells.append(f"{_pct(row['accuracy'])} [{100 * lo:.0f}, {100 * hi:.0f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method @ budget | by kind (frame / count / order) | prefill (s, batch) | KV cache per video |",
    ]
    lines.append("|---|---|---|---|")
    entries = [("full", full)] + [
        (f"{r['method']} @ {100 * r['retention_ratio']:g}%", r)
        for r in results["rows"]
        if r.get("accuracy") is not None
    ]
    for name, row in entries:
        kinds = " / ".join(_pct(v["accuracy"]) for v in row.get("by_kind", {}).values())
        prefill = f"{row['prefill_s']:.3f} ({row['prefill_batch']})" if "prefill_s" in row else "-"
        kv = (
            f"{row['kv_cache_bytes_per_sample'] / 1024:.0f} KiB"
            if "kv_cache_bytes_per_sample" in row
            else "-"
        )
        lines.append(f"| {name} | {kinds} | {prefill} | {kv} |")
    if results.get("oracles"):
        lines += [
            "",
            "| validity (fixed subset, all-token model) | accuracy | frame / count / order | tokens |",
        ]
        lines.append("|---|---|---|---|")
        for name, row in results["oracles"].items():
            kinds = " / ".join(_pct(v["accuracy"]) for v in row["by_kind"].values())
            lines.append(f"| {name} | {_pct(row['accuracy'])} | {kinds} | {row['mean_visual_tokens']:.1f} |")
    return "\n".join(lines)


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="all-token video model (default: the task's)")
    parser.add_argument(
        "--deft", default=None, help="video model with trained DeFT modules (default: the task's)"
    )
    parser.add_argument("--methods", default=",".join(("deft", *PER_FRAME_METHODS, "uniform_frames")))
    parser.add_argument("--ratios", default="0.5,0.25,0.125")
    parser.add_argument("--n", type=int, default=500, help="held-out videos")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--cost-samples", type=int, default=20, help="videos per cost measurement (0: off)")
    parser.add_argument("--no-oracles", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--report", default=None, help="print the tables of an existing results JSON and exit"
    )
    args = parser.parse_args(argv)
    if args.report:
        import json

        with open(args.report) as f:
            print(report(json.load(f)))
        return
    task = TASKS["video"]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.base, args.deft = args.base or task.checkpoint, args.deft or task.deft_checkpoint
    args.out = args.out or task.results
    methods = [m for m in args.methods.split(",") if m]
    valid = ("deft", *PER_FRAME_METHODS, "uniform_frames")
    unknown = [m for m in methods if m not in valid]
    if unknown:
        parser.error(
            f"unknown method(s) {unknown}; valid: {list(valid)} ({list(NO_VIDEO_METHODS)} take no video)"
        )
    ratios = [float(r) for r in args.ratios.split(",")]
    for folder in (args.base, *((args.deft,) if "deft" in methods else ())):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            parser.error(f"checkpoint folder {folder!r} has no config.json (see benchmarks/digits/README.md)")

    samples = task.make_split("test", args.n, seed=TEST_SEED)
    frames = samples[0].num_frames
    total = frames * TOKENS_PER_FRAME
    torch.set_grad_enabled(False)
    start = time.time()

    def run(model, processor, desc):
        return evaluate_model(model, processor, samples, task, args.batch_size, desc, args.cost_samples)

    model, processor = load(args.base, method_settings("full", 1.0))
    results = {
        "task": "video",
        "command": "python -m benchmarks.digits.evaluate_video "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "base": args.base,
        "deft_checkpoint": args.deft,
        "n": args.n,
        "test_seed": TEST_SEED,
        "frames": frames,
        "visual_tokens_full": total,
        "metric": score.__doc__,
        "costs": prefill_costs.__doc__ if args.cost_samples else None,
        "cost_samples": args.cost_samples,
        "torch_threads": torch.get_num_threads(),
        "not_measured": {m: "takes no video (needs the prompt or the decoder)" for m in NO_VIDEO_METHODS},
        "full": run(model, processor, "full"),
        "methods": [],
        "rows": [],
        "oracles": {},
    }
    print(f"full: {results['full']['accuracy']:.1%} {results['full'].get('by_kind')}")
    if not args.no_oracles:
        for name in ORACLES:
            rng = np.random.default_rng(0)
            results["oracles"][name] = subset_row(
                model,
                processor,
                samples,
                lambda i, s, name=name, rng=rng: oracle_keep(s, name, rng),
                args.batch_size,
                args.cost_samples,
                task.kinds,
            )
            print(name, f"{results['oracles'][name]['accuracy']:.1%}", results["oracles"][name]["by_kind"])
    if "deft" in methods:
        model, processor = load(args.deft, method_settings("full", 1.0))
        results["full_deft_checkpoint"] = run(model, processor, "full (deft ckpt)")
    for method in methods:
        results["methods"].append(method)
        for ratio in ratios:
            k = num_kept_tokens(total, ratio)
            row = {"method": method, "retention_ratio": ratio, "kept_tokens": k, "kept_share": k / total}
            if method == "uniform_frames":
                model, processor = load(args.base, method_settings("full", 1.0))
                keep = frame_sampling(frames, k)
                row.update(
                    subset_row(
                        model,
                        processor,
                        samples,
                        lambda i, s, keep=keep: keep,
                        args.batch_size,
                        args.cost_samples,
                        task.kinds,
                    )
                )
                row["kept_frames"] = sorted({int(t) // TOKENS_PER_FRAME for t in keep})
            else:
                per_frame = num_kept_tokens(TOKENS_PER_FRAME, ratio)
                if method == "deco" and int(per_frame**0.5) ** 2 != per_frame:
                    row.update(
                        accuracy=None, note=f"not applicable: DeCo pools to a square grid, K={per_frame}"
                    )
                    results["rows"].append(row)
                    continue
                folder = args.deft if method == "deft" else args.base
                try:
                    model, processor = load(folder, method_settings(method, ratio))
                except ValueError as err:  # the method's config-time check (a budget this tower cannot reach)
                    row.update(accuracy=None, note=f"not applicable: {err}")
                    results["rows"].append(row)
                    print(f"{method:15} {ratio:5.3f}: not applicable ({err})")
                    continue
                row.update(run(model, processor, f"{method}@{ratio}"))
                row["mean_visual_tokens"] = row.get("mean_visual_tokens_per_lm_layer", k)
            reference = (
                results.get("full_deft_checkpoint", results["full"]) if method == "deft" else results["full"]
            )
            row["share_of_full"] = row["accuracy"] / reference["accuracy"] if reference["accuracy"] else None
            results["rows"].append(row)
            print(
                f"{method:15} {ratio:5.3f} K={k:3d}: {row['accuracy']:.1%} "
                f"{ {k2: round(v['accuracy'], 3) for k2, v in row.get('by_kind', {}).items()} }"
            )
            atomic_write_json(args.out, results)  # partial results survive an interrupted run
    results["spread"] = spread_by_ratio(results["rows"], ratios)
    results["wall_time_s"] = time.time() - start
    atomic_write_json(args.out, results)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(report(results))
    print(f"wrote {args.out} in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
