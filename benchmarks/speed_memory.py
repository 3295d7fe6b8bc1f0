"""Speed and memory of every compression method at several budgets, on real-size architectures.

    python benchmarks/speed_memory.py                       # ~0.5B SigLIP + Qwen2 shape (default)
    python benchmarks/speed_memory.py --shape llava_1.5_7b  # LLaVA-1.5-7B shape, bf16 (opt-in, ~14 GB)

Random weights at the real shapes (`benchmarks/shapes/*.json`, nothing is downloaded): cost does not depend on
weight values. One process, one model; the compression method and budget are switched between runs and the
runs are interleaved (every repeat visits every configuration), so slow drift hits all of them alike.

Per configuration: prefill latency (median over repeats after a warm-up, `logits_to_keep=1` as in
`generate`), decode latency per token (a cached `generate` of `--decode-tokens` tokens minus its prefill),
KV-cache bytes after prefill, peak memory, the analytic prefill FLOPs (vision tower + language model), each as
a ratio to the uncompressed model next to the ideal ratio from the FLOPs, and the compressor's own time as a
share of prefill. Writes JSON (atomically) and a PNG plot.

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated` during the prefill (weights included).
- CPU (`--no-cpu-memory` skips it): a separate process (`benchmarks/cpu_memory.py`: started with glibc's
  mmap threshold fixed at 64 KiB, so every freed tensor is returned to the system and the resident size
  follows the live allocations; a larger configuration measured earlier cannot lend its freed memory to a
  smaller one) builds the model, runs one warm-up prefill per method (one-time allocations), then measures
  one prefill per configuration as the growth of the resident high-water mark over the resident size just
  before it (the weights and the inputs are already resident: they are the baseline; `weights_bytes` is
  reported apart). The prefill is split where the language model starts (a pre-hook on its first decoder
  layer reads and resets the high-water mark): the vision phase (vision tower, projector, compression) and
  the language-model phase (the decoder over the kept rows and the KV cache it writes). The probe runs
  before the timing model is built (one model in memory at a time).

`--text-layers N` keeps the first N decoder layers at full width (a shape whose weights do not fit in memory,
e.g. the 7B shape on a 24 GB machine shared with other jobs): the vision tower and per-layer costs are real,
the language model's totals are N / num_hidden_layers of the full model's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

try:
    from benchmarks import cpu_memory
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import cpu_memory
from modeling_deft_llava.configuration.deft_settings import DEFT_RECIPE
from modeling_deft_llava.utilities.process_state import restores_process_state

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration
from modeling_deft_llava.compressors.compression_registry import BASELINE_METHODS, build_method

MODEL_METHODS = tuple(BASELINE_METHODS)  # every baseline, in the registry's order

SHAPES = Path(__file__).parent / "shapes"
TEXT_TOKENS = 48  # prompt text around the image


def load_config(shape: str) -> DeftLlavaConfig:
    path = SHAPES / f"{shape}.json"
    if not path.exists():
        raise SystemExit(f"unknown --shape {shape!r}; valid: {sorted(p.stem for p in SHAPES.glob('*.json'))}")
    values = json.loads(path.read_text())
    values.pop("_comment", None)
    return DeftLlavaConfig(**values)


def reconfigure(model: DeftLlavaForConditionalGeneration, method: str | None, ratio: float) -> None:
    """Switch the compression method and budget of a loaded model in place (benchmark only)."""
    config, inner = model.config, model.model
    config.use_deft = method is not None
    config.deft_retention_ratio = ratio
    config.compression_method = method or "deft"
    inner.compressor = None
    inner._method_name = "deft" if method == "deft" else None
    if method == "deft":
        inner.deft.apply_config(config)
    elif method is not None:
        config.compression_settings = None
        inner.compressor = build_method(config).to(model.device, model.dtype)
        inner._method_name = inner.compressor.module_name
    # the modules were swapped by hand above: record the structure the model now has (see `_apply_config`)
    inner._built_with = {key: getattr(config, key) for key in inner.STRUCTURAL_SETTINGS}


def build_model(shape: str, dtype, device, first_ratio: float, text_layers: int | None = None):
    """The random-weight model of `shape` with a DeFT module (RTD off) ready for `reconfigure`; returns
    `(model, config, visual tokens per image)`. `text_layers`: keep only that many decoder layers."""
    torch.manual_seed(0)
    config = load_config(shape)
    if text_layers is not None:
        config.text_config.num_hidden_layers = text_layers
    config.use_deft = False
    with torch.device(device):
        model = DeftLlavaForConditionalGeneration(config).to(dtype).eval()
    config.deft_enable_rtd, config.deft_retention_ratio = False, first_ratio
    for key, value in DEFT_RECIPE.items():  # DeFT as shipped: question- and position-aware
        setattr(config, key, value)
    model.model.deft = build_method(config).to(device, dtype)  # compression_method="deft": the DeFT method
    return model, config, config.patch_tokens_per_image()


def resident_weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def memory_probe(shape: str, configs: list, dtype, batch: int, text_layers: int | None = None) -> list[dict]:
    """CPU peak memory of one prefill per configuration `(method or None, ratio)` (run in a process started by
    `cpu_memory.run_in_subprocess`, see the module docstring)."""
    device = torch.device("cpu")
    model, config, n = build_model(shape, dtype, device, configs[0][1], text_layers)

    def inputs_for(method, ratio):
        reconfigure(model, method, ratio)
        return build_inputs(config, model.config.num_kept_tokens(n), batch, dtype, device)

    return prefill_memory_rows(model, configs, inputs_for)


def prefill_memory_rows(model, configs: list, inputs_for) -> list[dict]:
    """One row per configuration `(method or None, ratio)`: the KV cache and the CPU peak memory of one prefill,
    split at the language model's first layer (the vision phase's peak, then the decoder's high-water mark).
    `inputs_for(method, ratio)` sets the model up for the configuration and returns its inputs. Each method's
    first prefill runs once untimed (its one-time allocations)."""
    phases = {}

    def language_model_starts(module, args, kwargs):
        phases["vision_peak"] = cpu_memory.peak_rss_bytes()
        cpu_memory.reset_peak()

    first_layer = model.model.language_model.layers[0]
    hook = first_layer.register_forward_pre_hook(language_model_starts, with_kwargs=True)
    warmed, rows = set(), []
    try:
        with torch.no_grad():
            for method, ratio in configs:
                inputs = inputs_for(method, ratio)
                if method not in warmed:  # one-time allocations of this method's first prefill
                    model(**inputs, use_cache=True, logits_to_keep=1)
                    warmed.add(method)
                phases.clear()
                out, mem = cpu_memory.measure(
                    lambda inputs=inputs: model(**inputs, use_cache=True, logits_to_keep=1)
                )
                baseline = mem["baseline_bytes"]
                vision = phases["vision_peak"] - baseline
                language = mem["peak_growth_bytes"]  # the high-water mark was reset when the decoder started
                rows.append(
                    {
                        "method": method or "none",
                        "retention_ratio": ratio,
                        "kv_bytes": kv_bytes(out.past_key_values),
                        "peak_memory_bytes": max(vision, language),
                        "vision_phase_peak_bytes": vision,
                        "language_phase_peak_bytes": language,
                        "retained_after_prefill_bytes": mem["retained_bytes"],
                        "resident_before_prefill_bytes": baseline,
                    }
                )
                del out
    finally:
        hook.remove()
    return rows


def lm_flops(text_config, tokens) -> float:
    """Forward FLOPs of a decoder (matmuls + attention scores; last-token head) over `tokens` positions in every
    layer (an int), or over `tokens[l]` positions in layer l (a list: a method that prunes inside the decoder)."""
    d, ff, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", heads) * (d // heads)
    per_token = 2 * (d * d + 2 * d * kv + d * d) + 2 * 3 * d * ff  # q, k, v, o projections + gated MLP
    per_layer = [tokens] * layers if isinstance(tokens, int) else list(tokens)
    # attention: QK^T and AV, causal masking ignored (upper bound)
    return sum(t * per_token + 2 * 2 * t * t * d for t in per_layer) + 2 * d * text_config.vocab_size


def layer_tokens(cache) -> list[int]:
    """Positions each decoder layer processed in a prefill: the length of its KV cache (batch row 0). A method
    that writes all N placeholders and re-packs (CDPruner, Recoverable, question-aware DeFT) shows its K here,
    and one that prunes inside the decoder (FastV) its per-layer counts."""
    return [int(layer.keys.shape[-2]) for layer in getattr(cache, "layers", []) if layer.keys is not None]


def vision_flops(vision_config, projector_out: int, tokens: int) -> float:
    d, ff, layers = (
        vision_config.hidden_size,
        vision_config.intermediate_size,
        vision_config.num_hidden_layers,
    )
    per_token = 2 * 4 * d * d + 2 * 2 * d * ff
    return (
        layers * (tokens * per_token + 2 * 2 * tokens * tokens * d)
        + tokens * 2 * (d + projector_out) * projector_out
    )


def build_inputs(config, num_placeholders: int, batch: int, dtype, device):
    vocab = config.text_config.vocab_size
    ids = torch.randint(100, min(vocab, 30000), (batch, TEXT_TOKENS + num_placeholders), device=device)
    ids[ids == config.image_token_index] = 100  # random text must not contain the placeholder id
    ids[:, 5 : 5 + num_placeholders] = config.image_token_index
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def decode_steps(model, out, inputs, steps: int) -> None:
    """Greedy cached decoding after a prefill, with the bookkeeping `generate` does (positions keep gaps)."""
    cache = out.past_key_values
    mask = out.deft_attention_mask if out.deft_attention_mask is not None else inputs["attention_mask"]
    if out.deft_position_ids is not None:
        position = out.deft_position_ids[:, -1:]
    else:
        position = (mask.long().cumsum(-1) - 1)[:, -1:]
    image_token = model.config.image_token_index

    def next_token(logits):
        logits = logits[:, -1:].clone()
        logits[..., image_token] = float("-inf")  # a random model may pick the placeholder id
        return logits.argmax(-1)

    token = next_token(out.logits)
    for _ in range(steps):
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        )
        token = next_token(step.logits)


def decode_growth(out, steps: int) -> int:
    """Bytes the decode steps appended to the cache (the cache object is shared), to report prefill KV."""
    cache = out.past_key_values
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (layer.keys, layer.values):
            total += tensor.numel() * tensor.element_size() // tensor.shape[-2] * steps
    return total


MEMORY_FIELDS = (
    "kv_bytes",
    "peak_memory_bytes",
    "vision_phase_peak_bytes",
    "language_phase_peak_bytes",
    "retained_after_prefill_bytes",
    "resident_before_prefill_bytes",
)


def ratio_or_none(extras, key, base, field):
    value, reference = extras[key].get(field), extras[base].get(field)
    return value / reference if value is not None and reference else None


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in results["runs"] if r["method"] != "none"]
    for method in sorted({r["method"] for r in rows}):
        pts = sorted(
            (r["kept_share"], r["prefill_speedup"], r["kv_ratio"]) for r in rows if r["method"] == method
        )
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
    ideal = sorted((r["kept_share"], r["ideal_speedup"]) for r in rows if r["method"] == rows[0]["method"])
    axes[0].plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", label="ideal (FLOPs)")
    ideal_kv = sorted(
        (r["kept_share"], r["ideal_kv_ratio"]) for r in rows if r["method"] == rows[0]["method"]
    )
    axes[1].plot(
        [p[0] for p in ideal_kv], [p[1] for p in ideal_kv], "k--", label="proportional to tokens (incl. text)"
    )
    axes[0].set(xlabel="visual tokens kept (share)", ylabel="prefill speedup (x)", title=results["shape"])
    axes[1].set(xlabel="visual tokens kept (share)", ylabel="KV cache / uncompressed", title="KV cache")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_tables(results: dict) -> str:
    """The README's speed and memory tables of a results JSON (`--report PATH`)."""
    mb = lambda b: f"{b / 2**20:.1f} MB" if b is not None else "n/a"  # noqa: E731
    ratio = lambda r: f"{r:.3f}" if r is not None else "n/a"  # noqa: E731
    runs = results["runs"]
    lines = [
        "| method | kept | prefill | speedup | ideal | share of ideal | decode / token |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        kept = f"{r['kept_tokens']}" + (f" ({r['retention_ratio']:.1%})" if r["method"] != "none" else "")
        share = f"{r['share_of_ideal_speedup']:.1%}" if r["method"] != "none" else ""
        lines.append(
            f"| {r['method']} | {kept} | {r['prefill_s']:.2f} s | {r['prefill_speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {share} | {1000 * r['decode_s_per_token']:.1f} ms |"
        )
    lines += [
        "",
        "| method | kept | tokens (text + visual) / full | KV cache | KV / full | prefill peak | peak / full "
        "| vision phase | language-model phase | LM phase / full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['method']} | {r['kept_tokens']} | {ratio(r['ideal_kv_ratio'])} | {mb(r['kv_bytes'])} | "
            f"{ratio(r['kv_ratio'])} | {mb(r.get('peak_memory_bytes'))} | {ratio(r.get('peak_memory_ratio'))} | "
            f"{mb(r.get('vision_phase_peak_bytes'))} | {mb(r.get('language_phase_peak_bytes'))} | "
            f"{ratio(r.get('language_phase_peak_ratio'))} |"
        )
    base = runs[0]
    lines += [
        "",
        f"weights {mb(results.get('weights_bytes'))}; resident before the prefill "
        f"{mb(base.get('resident_before_prefill_bytes'))}; DeFT scoring {1000 * results['deft_scoring_s']:.1f} ms "
        f"= {results['deft_scoring_share_of_uncompressed_prefill']:.2%} of the uncompressed prefill; "
        f"{results['threads']} thread(s), {results['dtype']}, batch {results['batch']}, decoder layers "
        f"{results.get('text_layers')} of {results.get('text_layers_of_shape')}; command: `{results['command']}`",
    ]
    return "\n".join(lines)


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="siglip_qwen2_0.5b")
    parser.add_argument(
        "--methods", default="deft,random,uniform,divprune", help=f"comma list of deft, {MODEL_METHODS}"
    )
    parser.add_argument("--ratios", default="0.5,0.482,0.25,0.125")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 for the 7B shape)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/speed_<shape>.json)"
    )
    parser.add_argument(
        "--no-cpu-memory", action="store_true", help="on CPU, skip the peak-memory probes (a process each)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--text-layers",
        type=int,
        default=None,
        help="keep only the first N decoder layers (full width), for a shape too large for this machine",
    )
    parser.add_argument("--report", default=None, help="print the markdown tables of a results JSON and exit")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: METHOD:RATIO,...
    args = parser.parse_args(argv)
    if args.report is not None:
        print(markdown_tables(json.loads(Path(args.report).read_text())))
        return

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m != "deft" and m not in MODEL_METHODS:
            parser.error(f"unknown method {m!r}; valid: deft, {', '.join(MODEL_METHODS)}")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        parser.error(f"--ratios must be numbers, got {args.ratios!r}")
    if any(not 0 < r <= 1 for r in ratios):
        parser.error(f"every ratio must be in (0, 1], got {ratios}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = load_config(args.shape)
    shape_layers = config.text_config.num_hidden_layers
    if args.text_layers is not None and not 1 <= args.text_layers <= shape_layers:
        parser.error(f"--text-layers must be in [1, {shape_layers}] for {args.shape}, got {args.text_layers}")
    if "visionzip" in methods and config.vision_feature_select_strategy == "full":
        parser.error("visionzip needs a CLS token; this shape's encoder has none")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if "7b" in args.shape else torch.float32)
    )
    if args.memory_probe is not None:  # internal: CPU memory of each METHOD:RATIO, printed as JSON
        probe_configs = []
        for item in args.memory_probe.split(","):
            method, ratio = item.rsplit(":", 1)
            probe_configs.append((None if method == "none" else method, float(ratio)))
        print(json.dumps(memory_probe(args.shape, probe_configs, dtype, args.batch, args.text_layers)))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = Path(args.out or f"benchmarks/results/speed_{args.shape}.json")
    n = config.patch_tokens_per_image()
    configs = [(None, 1.0)]
    for m in methods:
        for r in ratios:
            k = max(1, int(r * n + 0.5))
            if m == "deco" and int(k**0.5) ** 2 != k:
                print(f"skipping deco at ratio {r}: K={k} is not a perfect square (DeCo pools to m x m)")
                continue
            configs.append((m, r))
    cpu_peaks = {}
    if device.type == "cpu" and not args.no_cpu_memory:
        print(
            f"CPU peak memory of {len(configs)} configurations (one process, see the docstring)", flush=True
        )
        probe_argv = [str(Path(__file__).resolve()), "--shape", args.shape, "--batch", str(args.batch)]
        probe_argv += ["--dtype", str(dtype)[6:], "--threads", str(torch.get_num_threads()), "--memory-probe"]
        probe_argv += [",".join(f"{method or 'none'}:{ratio}" for method, ratio in configs)]
        if args.text_layers is not None:
            probe_argv += ["--text-layers", str(args.text_layers)]
        for row in cpu_memory.run_in_subprocess(probe_argv):
            cpu_peaks[(None if row["method"] == "none" else row["method"], row["retention_ratio"])] = row

    model, config, n = build_model(args.shape, dtype, device, ratios[0], args.text_layers)
    timer = Timer(device)
    samples = {c: {"prefill": [], "decode": []} for c in configs}
    extras = {}
    with torch.no_grad():
        for repeat in tqdm(range(args.repeats + 1), desc="repeats (first is warm-up)"):
            for method, ratio in tqdm(configs, desc="configs", leave=False):
                reconfigure(model, method, ratio)
                k = model.config.num_kept_tokens(n)
                inputs = build_inputs(config, k, args.batch, dtype, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                out = None

                def run_prefill(inputs=inputs):
                    nonlocal out
                    out = model(**inputs, use_cache=True, logits_to_keep=1)

                prefill = timer(run_prefill)
                seen = layer_tokens(out.past_key_values)  # before decoding grows the cache
                decode = timer(
                    lambda out=out, inputs=inputs: decode_steps(model, out, inputs, args.decode_tokens)
                )
                kv_bytes_after_prefill = kv_bytes(out.past_key_values) - decode_growth(
                    out, args.decode_tokens
                )
                if repeat == 0:
                    extras[(method, ratio)] = {
                        "placeholders": k,
                        "layer_tokens": seen,
                        "kv_bytes": kv_bytes_after_prefill,
                        "peak_memory_bytes": torch.cuda.max_memory_allocated()
                        if device.type == "cuda"
                        else None,
                    }
                    if (method, ratio) in cpu_peaks:
                        probe = cpu_peaks[(method, ratio)]
                        if probe["kv_bytes"] != kv_bytes_after_prefill:
                            raise RuntimeError(
                                f"memory probe of {method}@{ratio} saw another KV cache: {probe}"
                            )
                        extras[(method, ratio)].update(
                            {key: probe[key] for key in MEMORY_FIELDS if key != "kv_bytes"}
                        )
                    continue
                samples[(method, ratio)]["prefill"].append(prefill)
                samples[(method, ratio)]["decode"].append(decode / args.decode_tokens)
        # the compressor's own cost on the projected features
        features = torch.randn(args.batch, n, config.text_config.hidden_size, device=device, dtype=dtype)
        side = int(n**0.5)
        # the question: the prompt's TEXT_TOKENS embeddings (question-aware DeFT reads them all)
        question = torch.randn(
            args.batch, TEXT_TOKENS, config.text_config.hidden_size, device=device, dtype=dtype
        )
        question_mask = torch.ones(args.batch, TEXT_TOKENS, dtype=torch.bool, device=device)
        scoring = statistics.median(
            timer(
                lambda: model.model.deft(
                    tokens=features,
                    modality="image",
                    spatial_shape=(side, side),
                    question_embeds=question,
                    question_mask=question_mask,
                )
            )
            for _ in range(args.repeats + 1)
        )

    proj_out = config.text_config.hidden_size
    vision = vision_flops(
        config.vision_config, proj_out, n + (1 if config.vision_feature_select_strategy == "default" else 0)
    )
    base = (None, 1.0)
    base_prefill = statistics.median(samples[base]["prefill"])
    base_decode = statistics.median(samples[base]["decode"])
    base_flops = vision + lm_flops(config.text_config, extras[base]["layer_tokens"])
    runs = []
    for method, ratio in configs:
        # the ideal comes from the tokens each decoder layer really processed (not the placeholders: a method
        # that writes all N and re-packs to K runs K), so "share of ideal" compares like with like
        seen = extras[(method, ratio)]["layer_tokens"]
        k = round(statistics.mean(seen)) - TEXT_TOKENS  # visual tokens per decoder layer, on average
        flops = vision + lm_flops(config.text_config, seen)
        prefill = statistics.median(samples[(method, ratio)]["prefill"])
        decode = statistics.median(samples[(method, ratio)]["decode"])
        ideal = base_flops / flops
        row = {
            "method": method or "none",
            "retention_ratio": ratio,
            "kept_tokens": k,
            "placeholders": extras[(method, ratio)]["placeholders"],
            "layer_tokens": seen,
            "kept_share": k / n,
            "prefill_s": prefill,
            "prefill_speedup": base_prefill / prefill,
            "ideal_speedup": ideal,
            "share_of_ideal_speedup": (base_prefill / prefill) / ideal,
            "decode_s_per_token": decode,
            "decode_ratio": decode / base_decode,
            "kv_bytes": extras[(method, ratio)]["kv_bytes"],
            "kv_ratio": extras[(method, ratio)]["kv_bytes"] / extras[base]["kv_bytes"],
            "ideal_kv_ratio": (TEXT_TOKENS + k) / (TEXT_TOKENS + n),
            **{key: extras[(method, ratio)].get(key) for key in MEMORY_FIELDS if key != "kv_bytes"},
            "peak_memory_ratio": ratio_or_none(extras, (method, ratio), base, "peak_memory_bytes"),
            "language_phase_peak_ratio": ratio_or_none(
                extras, (method, ratio), base, "language_phase_peak_bytes"
            ),
            "prefill_flops": flops,
            "flops_ratio": flops / base_flops,
        }
        runs.append(row)
    results = {
        "shape": args.shape,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "batch": args.batch,
        "text_layers": config.text_config.num_hidden_layers,
        "text_layers_of_shape": shape_layers,
        "text_tokens": TEXT_TOKENS,
        "visual_tokens_full": n,
        "repeats": args.repeats,
        "peak_memory": (
            "cuda.max_memory_allocated (weights included)"
            if device.type == "cuda"
            else None
            if not cpu_peaks
            else "CPU resident high-water mark growth over the resident size before the prefill (weights and "
            "inputs excluded), fresh process per configuration, warm-up first; see benchmarks/cpu_memory.py"
        ),
        "weights_bytes": resident_weight_bytes(model),
        "deft_scoring_s": scoring,
        "deft_scoring_share_of_uncompressed_prefill": scoring / base_prefill,
        "command": "python benchmarks/speed_memory.py "
        + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "runs": runs,
    }
    write_json_atomic(out_path, results)
    plot(results, out_path.with_suffix(".png"))
    header = f"{'method':10} {'ratio':>6} {'K':>4} {'prefill s':>9} {'speedup':>8} {'ideal':>6} {'of ideal':>8} {'decode ms':>9} {'KV':>6} {'peak MB':>8}"
    print(header)
    for r in runs:
        peak = r["peak_memory_bytes"]
        print(
            f"{r['method']:10} {r['retention_ratio']:6.3f} {r['kept_tokens']:4d} {r['prefill_s']:9.3f} "
            f"{r['prefill_speedup']:8.2f} {r['ideal_speedup']:6.2f} {r['share_of_ideal_speedup']:8.1%} "
            f"{1000 * r['decode_s_per_token']:9.1f} {r['kv_ratio']:6.3f} "
            + (f"{peak / 2**20:8.1f}" if peak is not None else f"{'n/a':>8}")
        )
    print(
        f"DeFT scoring: {scoring * 1000:.1f} ms = {results['deft_scoring_share_of_uncompressed_prefill']:.2%} of uncompressed prefill"
    )
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
