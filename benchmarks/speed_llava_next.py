"""Prefill speed-up against the FLOP-ideal, KV cache and CPU peak memory of DeFT-LLaVA-NeXT (AnyRes).

    python benchmarks/speed_llava_next.py --text-layers 2 --ratios 0.5,0.25,0.125 --repeats 2

Random weights at the LLaVA-NeXT-7B shape (`benchmarks/shapes/llava_next_7b.json`: CLIP ViT-L/14-336, a
Vicuna-7B-sized decoder, the llava-v1.6 grid pinpoints), one 672x672 image: a base view and 2x2 tiles, 5 views
through the vision tower, 576 + 48 x 49 = 2,928 visual tokens (the 48 row markers included), 48 text tokens,
batch 1. The same measurements as `benchmarks/speed_memory.py` (its helpers: FLOP counts, KV bytes, the timer,
`reconfigure`), interleaved repeats, medians after a warm-up:
- prefill time (`logits_to_keep=1`) and its speed-up over the uncompressed model, next to the ideal speed-up from
  the analytic prefill FLOPs: 5 views through the vision tower (not compressed: it bounds the speed-up) plus the
  decoder over the tokens each layer really held (its KV length);
- the KV cache after prefill and the CPU peak memory of one prefill (a separate process started with a fixed
  malloc mmap threshold: `benchmarks/cpu_memory.py`), split at the first decoder layer into the vision phase and
  the language-model phase.
`--text-layers N` keeps N of the 32 decoder layers at full width (the 7B weights do not fit this machine next to
other jobs): per-layer costs are real, the language model's totals are N/32 of the real model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_memory  # noqa: E402
from modeling_deft_llava.configuration.deft_settings import DEFT_RECIPE  # noqa: E402
from speed_memory import (  # noqa: E402
    TEXT_TOKENS,
    Timer,
    kv_bytes,
    layer_tokens,
    lm_flops,
    prefill_memory_rows,
    reconfigure,
    vision_flops,
    write_json_atomic,
)

from modeling_deft_llava import DeftLlavaNextConfig, DeftLlavaNextForConditionalGeneration  # noqa: E402
from modeling_deft_llava.compressors.compression_registry import build_method  # noqa: E402

SHAPE = Path(__file__).parent / "shapes" / "llava_next_7b.json"
IMAGE_SIZE = (672, 672)  # (height, width): the 672x672 pinpoint, 2x2 tiles, nothing unpadded


def build_model(text_layers: int | None, dtype, first_ratio: float, shape: Path = SHAPE):
    """The random-weight model of `shape` (a JSON of `DeftLlavaNextConfig` fields) with a DeFT module as
    `convert` writes it but question-blind (the measured table's setting; the benchmark's random prompt has no
    question), RTD off."""
    torch.manual_seed(0)
    values = json.loads(Path(shape).read_text())
    values.pop("_comment", None)
    config = DeftLlavaNextConfig(**values)
    if text_layers is not None:
        config.text_config.num_hidden_layers = text_layers
    model = DeftLlavaNextForConditionalGeneration(config).to(dtype).eval()
    config.deft_enable_rtd, config.deft_retention_ratio = False, first_ratio
    for key, value in {**DEFT_RECIPE, "deft_question_aware": False}.items():
        setattr(config, key, value)
    model.model.deft = build_method(config).to(dtype)
    return model, config


def placeholders(model) -> int:
    layout = model.model.anyres_layout(list(IMAGE_SIZE))
    if not model.config.use_deft:
        return layout.num_tokens
    return layout.count(
        model.config.deft_retention_ratio, model.config.anyres_budget, model.config.anyres_image_newline
    )


def build_inputs(model, dtype) -> dict:
    config = model.config
    k = placeholders(model)
    generator = torch.Generator().manual_seed(0)
    high = min(config.text_config.vocab_size, 30000)
    low = min(100, high // 2)
    ids = torch.randint(low, high, (1, TEXT_TOKENS + k), generator=generator)
    ids[ids == config.image_token_index] = low
    ids[:, 5 : 5 + k] = config.image_token_index
    size = config.vision_config.image_size
    views = num_views(config)
    pixels = torch.randn(1, views, 3, size, size, generator=generator).to(dtype)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_sizes": torch.tensor([IMAGE_SIZE]),
    }


def num_views(config) -> int:
    """Vision passes of the benchmark image: the base view and its tiles (the stock count)."""
    return image_size_to_num_patches(
        list(IMAGE_SIZE), config.image_grid_pinpoints, config.vision_config.image_size
    )


def memory_probe(configs, text_layers, dtype, shape: Path = SHAPE) -> list[dict]:
    """CPU peak memory of one prefill per configuration (in a process started by `cpu_memory.run_in_subprocess`)."""
    model, _ = build_model(text_layers, dtype, configs[0][1], shape)

    def inputs_for(method, ratio):
        reconfigure(model, method, ratio)
        return build_inputs(model, dtype)

    return prefill_memory_rows(model, configs, inputs_for)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=str(SHAPE), help="JSON of DeftLlavaNextConfig fields")
    parser.add_argument("--methods", default="deft,random")
    parser.add_argument("--ratios", default="0.5,0.25,0.125")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-cpu-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/speed_llava_next_7b.json")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.memory_probe is not None:
        configs = [
            (None if m == "none" else m, float(r))
            for m, r in (item.rsplit(":", 1) for item in args.memory_probe.split(","))
        ]
        print(json.dumps(memory_probe(configs, args.text_layers, dtype, args.shape)))
        return
    ratios = [float(r) for r in args.ratios.split(",")]
    configs = [(None, 1.0)] + [(m, r) for m in args.methods.split(",") for r in ratios]
    peaks = {}
    if not args.no_cpu_memory:
        probe = [
            str(Path(__file__).resolve()),
            "--dtype",
            args.dtype,
            "--threads",
            str(torch.get_num_threads()),
        ]
        probe += ["--shape", args.shape, "--memory-probe", ",".join(f"{m or 'none'}:{r}" for m, r in configs)]
        if args.text_layers is not None:
            probe += ["--text-layers", str(args.text_layers)]
        for row in cpu_memory.run_in_subprocess(probe):
            peaks[(None if row["method"] == "none" else row["method"], row["retention_ratio"])] = row
    model, config = build_model(args.text_layers, dtype, ratios[0], args.shape)
    timer = Timer(torch.device("cpu"))
    samples = {c: [] for c in configs}
    compress = {c: [] for c in configs if c[0] is not None}
    seen, kv, kept = {}, {}, {}
    with torch.no_grad():
        # the compression step alone, on the image's stock features (`_compress_image`: every token set through
        # the method, the row markers put back): its share of the uncompressed prefill
        reconfigure(model, None, 1.0)
        uncompressed = build_inputs(model, dtype)
        feature = model.model.get_image_features(
            uncompressed["pixel_values"], image_sizes=uncompressed["image_sizes"]
        ).pooler_output[0]
        layout = model.model.anyres_layout(list(IMAGE_SIZE))
        for repeat in range(args.repeats + 1):
            for method, ratio in configs:
                reconfigure(model, method, ratio)
                inputs = build_inputs(model, dtype)
                out = None

                def run(inputs=inputs):
                    nonlocal out
                    out = model(**inputs, use_cache=True, logits_to_keep=1)

                elapsed = timer(run)
                print(f"repeat {repeat} {method or 'none'}@{ratio}: {elapsed:.2f} s", flush=True)
                if repeat == 0:  # warm-up
                    seen[(method, ratio)] = layer_tokens(out.past_key_values)
                    kv[(method, ratio)] = kv_bytes(out.past_key_values)
                    kept[(method, ratio)] = placeholders(model)
                    continue
                samples[(method, ratio)].append(elapsed)
                if method is not None:
                    compress[(method, ratio)].append(
                        timer(lambda: model.model._compress_image(model.model.active_method, feature, layout))
                    )
    views = num_views(config)
    vision_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    vision = views * vision_flops(config.vision_config, config.text_config.hidden_size, vision_tokens)
    base = (None, 1.0)
    base_time = statistics.median(samples[base])
    base_flops = vision + lm_flops(config.text_config, seen[base])
    runs = []
    for c in configs:
        flops = vision + lm_flops(config.text_config, seen[c])
        speedup = base_time / statistics.median(samples[c])
        row = {
            "method": c[0] or "none",
            "retention_ratio": c[1],
            "visual_tokens": kept[c],
            "layer_tokens": seen[c],
            "prefill_s": statistics.median(samples[c]),
            "prefill_speedup": speedup,
            "ideal_speedup": base_flops / flops,
            "share_of_ideal_speedup": speedup / (base_flops / flops),
            "kv_bytes": kv[c],
            "kv_ratio": kv[c] / kv[base],
        }
        if c in compress:
            row["compression_s"] = statistics.median(compress[c])
            row["compression_share_of_full_prefill"] = row["compression_s"] / base_time
        if c in peaks:
            for key in ("peak_memory_bytes", "vision_phase_peak_bytes", "language_phase_peak_bytes"):
                row[key] = peaks[c][key]
            row["peak_memory_ratio"] = peaks[c]["peak_memory_bytes"] / peaks[base]["peak_memory_bytes"]
        runs.append(row)
    results = {
        "shape": Path(args.shape).stem,
        "image_size": list(IMAGE_SIZE),
        "text_layers": config.text_config.num_hidden_layers,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "command": "python benchmarks/speed_llava_next.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": runs,
    }
    write_json_atomic(Path(args.out), results)
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        "| method | visual tokens | prefill | speed-up | ideal | share of ideal | compression step | KV / full | peak (vision, LM phase) | peak / full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        peak = (
            f"{r['vision_phase_peak_bytes'] / 2**20:.0f} / {r['language_phase_peak_bytes'] / 2**20:.0f} MB"
            if "peak_memory_bytes" in r
            else ""
        )
        lines.append(
            f"| {r['method']} | {r['visual_tokens']} ({r['retention_ratio']:.1%}) | {r['prefill_s']:.2f} s | "
            f"{r['prefill_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['share_of_ideal_speedup']:.1%} | "
            + (f"{r['compression_s'] * 1000:.0f} ms | " if "compression_s" in r else " | ")
            + f"{r['kv_ratio']:.3f} | {peak} | {r.get('peak_memory_ratio', float('nan')):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
