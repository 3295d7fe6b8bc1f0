"""Where two compression methods' prefills differ: an operator-level diff of one prefill each (torch.profiler).

    python benchmarks/profile_prefill.py --methods deft,divprune --ratio 0.25 --threads 1

Wall-clock time on a shared machine moves by several percent from run to run, so a gap between two methods'
prefill times does not say whether one method's path does more work. This script answers that directly: the
same model (`benchmarks/shapes/<shape>.json`, random weights, as `speed_memory.py` builds it) runs one warm-up
and then `--repeats` profiled prefills per method, interleaved, with the same K; every operator call is grouped
by (operator, input shapes). Operators that both paths call equally often with the same shapes (the vision
tower, the language model over the same number of rows) are "shared"; the rest are the methods' own work
(scoring, selection, copies). It prints, per method, the wall and process CPU time of each prefill, the self
CPU time of the shared and of the own operators, and the own operators that cost most. With `--threads 1`
the process CPU time is close to the work done, whatever the load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from modeling_deft_llava.utilities.process_state import restores_process_state
from torch.profiler import ProfilerActivity, profile

try:
    from benchmarks.speed_memory import build_inputs, build_model, reconfigure
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from speed_memory import build_inputs, build_model, reconfigure


def operator_table(prof) -> dict[str, tuple[int, float]]:
    """`"op [shapes]"` -> (calls, self CPU ms) of a finished profile."""
    return {
        f"{e.key} {e.input_shapes}": (e.count, e.self_cpu_time_total / 1e3)
        for e in prof.key_averages(group_by_input_shape=True)
    }


def split_shared(tables: dict[str, dict]) -> tuple[set, dict[str, dict]]:
    """Keys called equally often by every method (shared), and each method's own keys with their cost."""
    methods = list(tables)
    keys = set().union(*tables.values())
    shared = {k for k in keys if len({tables[m].get(k, (0, 0.0))[0] for m in methods}) == 1}
    own = {m: {k: v for k, v in tables[m].items() if k not in shared} for m in methods}
    return shared, own


@restores_process_state
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="siglip_qwen2_0.5b")
    parser.add_argument("--methods", default="deft,divprune", help="two or more methods (or 'none')")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2, help="profiled prefills per method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15, help="own operators printed per method")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if len(methods) < 2:
        parser.error(f"--methods needs at least two methods to compare, got {args.methods!r}")
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    model, config, n = build_model(args.shape, torch.float32, torch.device("cpu"), args.ratio)
    times = {m: [] for m in methods}
    tables = {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for method in methods:
                reconfigure(model, None if method == "none" else method, args.ratio)
                k = model.config.num_kept_tokens(n) if method != "none" else n
                torch.manual_seed(1)  # the same random prompt and pixels for every method
                inputs = build_inputs(config, k, 1, torch.float32, torch.device("cpu"))
                if repeat == 0:  # warm-up
                    model(**inputs, use_cache=True, logits_to_keep=1)
                    continue
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    wall, cpu = time.perf_counter(), time.process_time()
                    model(**inputs, use_cache=True, logits_to_keep=1)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                times[method].append((wall, cpu))
                tables[method] = operator_table(prof)  # the last repeat's
    shared, own = split_shared(tables)
    print(
        f"shape {args.shape}, ratio {args.ratio}, {args.threads} thread(s), {args.repeats} profiled prefill(s)"
    )
    for method in methods:
        walls = ", ".join(f"{w:.2f}" for w, _ in times[method])
        cpus = ", ".join(f"{c:.2f}" for _, c in times[method])
        shared_ms = sum(v[1] for k, v in tables[method].items() if k in shared)
        own_ms = sum(v[1] for v in own[method].values())
        print(
            f"{method}: wall {walls} s (median {statistics.median(w for w, _ in times[method]):.2f}); "
            f"process CPU {cpus} s; self CPU of shared operators {shared_ms:.0f} ms, of its own {own_ms:.1f} ms"
        )
        for key, (count, ms) in sorted(own[method].items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(f"    {ms:8.2f} ms  {count:4d}x  {key[:150]}")


if __name__ == "__main__":
    main()
