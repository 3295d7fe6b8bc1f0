"""Benchmark scripts stop at once with a clear message on bad input, and write complete results files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks import speed_memory  # noqa: E402
from benchmarks.digits import evaluate_methods  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "deft,bogus"], "unknown method"),
        (["--ratios", "0.5,1.5"], "every ratio must be in"),
        (["--ratios", "half"], "must be comma-separated numbers"),
        (["--base", "/nonexistent"], "has no config.json"),
    ],
)
def test_accuracy_benchmark_rejects_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate_methods.main([*argv, "--out", str(tmp_path / "r.json")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "bogus"], "unknown method"),
        (["--ratios", "0"], "every ratio must be in"),
        (["--shape", "nope"], "unknown --shape"),
    ],
)
def test_speed_benchmark_rejects_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        speed_memory.main([*argv, "--out", str(tmp_path / "s.json")])
    assert message in capsys.readouterr().err + str(info.value)


def run_tiny(out, *extra):
    speed_memory.main(
        [
            "--shape",
            "tiny",
            "--methods",
            "deft,random",
            "--ratios",
            "0.25",
            "--repeats",
            "1",
            "--decode-tokens",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )
    results = json.loads(out.read_text())
    return results, {r["method"]: r for r in results["runs"]}


def test_speed_benchmark_runs_on_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "speed.json"
    results, rows = run_tiny(out, "--no-cpu-memory")
    assert rows["deft"]["kept_tokens"] == 16 and rows["none"]["kept_tokens"] == 64
    assert rows["deft"]["kv_bytes"] < rows["none"]["kv_bytes"]
    assert (
        abs(rows["deft"]["kv_ratio"] - rows["deft"]["ideal_kv_ratio"]) < 1e-9
    )  # KV falls exactly with tokens kept
    assert out.with_suffix(".png").exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert results["peak_memory"] is None and rows["deft"]["peak_memory_bytes"] is None
    speed_memory.main(["--report", str(out)])  # the README tables of that JSON
    tables = capsys.readouterr().out
    assert (
        "| deft | 16 (25.0%) |" in tables
        and "| none | 64 | 1.000 |" in tables
        and results["command"] in tables
    )


def test_the_memory_probe_splits_the_prefill_into_its_two_phases(monkeypatch):
    """In-process (fast; the honest reading needs the fresh process of the slow test below): one row per
    configuration, the peak is the larger phase, and the KV cache falls with the tokens kept."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # measure() refuses to run without it
    rows = speed_memory.memory_probe("tiny", [(None, 1.0), ("deft", 0.25)], torch.float32, 1)
    assert [(r["method"], r["retention_ratio"]) for r in rows] == [("none", 1.0), ("deft", 0.25)]
    for row in rows:
        assert row["peak_memory_bytes"] == max(
            row["vision_phase_peak_bytes"], row["language_phase_peak_bytes"]
        )
        assert row["resident_before_prefill_bytes"] > 0
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]


@pytest.mark.slow
def test_speed_benchmark_measures_cpu_memory_in_a_fresh_process(tmp_path):
    results, rows = run_tiny(tmp_path / "speed.json")
    assert results["peak_memory"].startswith("CPU resident high-water mark")
    assert results["weights_bytes"] > 0
    for row in rows.values():
        assert row["peak_memory_bytes"] == max(
            row["vision_phase_peak_bytes"], row["language_phase_peak_bytes"]
        )
        assert row["language_phase_peak_bytes"] >= 0 and row["peak_memory_ratio"] is not None


def test_text_context_benchmark_compares_methods_at_the_same_budget(tmp_path):
    from benchmarks import text_context

    out = tmp_path / "facts.json"
    argv = ["--train-steps", "2", "--deft-steps", "1", "--batch", "4", "--n-test", "8", "--ratios", "0.5"]
    report = text_context.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    seen = {name: r["context_tokens_seen"] for name, r in report["results"].items() if name != "full"}
    assert set(seen) == {f"{m}@0.500" for m in ("deft_untrained", "deft", "random", "first", "last")}
    assert len(set(seen.values())) == 1  # every method keeps the same number of context tokens
    assert report["results"]["full"]["context_tokens_seen"] == 2 * next(iter(seen.values()))
