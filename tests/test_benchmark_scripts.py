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
    argv += ["--long-facts", "8", "--time-samples", "1"]
    report = text_context.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
    for facts, results in ((6, report["results"]), (8, report["longer_contexts"]["8"]["results"])):
        seen = {name: r["context_tokens_seen"] for name, r in results.items() if name != "full"}
        kept = {name: n for name, n in seen.items() if not name.startswith("kvpress_")}
        methods = ("deft_untrained", "deft", "random", "first", "last", "fastv", "fastv_pre")
        assert set(kept) == {f"{m}@0.500" for m in methods}
        assert set(kept.values()) == {7 * facts / 2}  # every method keeps the same number of context tokens
        assert results["full"]["context_tokens_seen"] == 7 * facts
        # KV entries per layer: the rules and DeFT drop tokens in every layer, FastV after its first layer
        assert results["fastv@0.500"]["kv_per_layer"] > results["fastv_pre@0.500"]["kv_per_layer"]
        assert results["fastv_pre@0.500"]["kv_per_layer"] == results["random@0.500"]["kv_per_layer"]
        assert all(
            r["prefill_ms"] > 0 for name, r in results.items() if not name.startswith("deft_untrained")
        )
    from benchmarks import text_context_table

    text = text_context_table.main([str(out)])
    assert "| fastv (inside the decoder) |" in text and "8 facts (same model)" in text
    if "error" in report["kvpress"]:  # kvpress not installed: the rows are skipped with the reason
        assert "kvpress is not installed" in report["kvpress"]["error"]
    else:
        kv = report["results"]["kvpress_knorm@0.500"]
        assert kv["kv_per_layer"] == report["results"]["random@0.500"]["kv_per_layer"]  # the same KV budget


def test_accuracy_update_replaces_only_the_rerun_methods():
    row = lambda method, ratio, acc: {"method": method, "retention_ratio": ratio, "accuracy": acc}  # noqa: E731
    previous = {
        "full": {"accuracy": 0.8},
        "methods": ["deft", "recoverable", "tome"],
        "rows": [row(m, r, 0.1) for m in ("deft", "recoverable", "tome") for r in (0.5, 0.25)],
    }
    update = {
        "full": {"accuracy": 0.8},
        "command": "python -m benchmarks.digits.evaluate_methods --methods recoverable,cdpruner --update",
        "methods": ["recoverable", "cdpruner"],
        "rows": [row(m, r, 0.3) for m in ("recoverable", "cdpruner") for r in (0.5, 0.25)],
    }
    merged = evaluate_methods.merge_update(previous, update)
    assert merged["methods"] == ["deft", "recoverable", "tome", "cdpruner"]
    assert [(r["method"], r["retention_ratio"], r["accuracy"]) for r in merged["rows"]] == [
        ("deft", 0.5, 0.1),
        ("deft", 0.25, 0.1),
        ("recoverable", 0.5, 0.3),
        ("recoverable", 0.25, 0.3),
        ("tome", 0.5, 0.1),
        ("tome", 0.25, 0.1),
        ("cdpruner", 0.5, 0.3),
        ("cdpruner", 0.25, 0.3),
    ]
    assert merged["updates"][0]["command"] == update["command"]
    assert previous["methods"] == ["deft", "recoverable", "tome"]  # the input is not modified
    with pytest.raises(ValueError, match="all-token accuracy"):
        evaluate_methods.merge_update(previous, {**update, "full": {"accuracy": 0.7}})


def test_accuracy_update_needs_an_existing_file(capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate_methods.main(["--methods", "random", "--update", "--out", str(tmp_path / "none.json")])
    assert "--update needs an existing results file" in capsys.readouterr().err


def test_rtd_calibration_helpers():
    from benchmarks.digits import calibrate_rtd

    assert calibrate_rtd.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert calibrate_rtd.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert calibrate_rtd.auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5  # ties: one half
    assert calibrate_rtd.auroc([0.5, 0.4], [True, True]) is None
    # K/2 extra tokens: a share K / (2 (N - K)) of the pruned tokens (or samples)
    assert calibrate_rtd.target_share("extra-half-budget", 16, 64) == pytest.approx(1 / 6)
    assert calibrate_rtd.target_share("0.3", 16, 64) == 0.3
    with pytest.raises(ValueError, match="--target"):
        calibrate_rtd.target_share("1.5", 16, 64)


def test_ablation_rejects_unknown_variants(capsys):
    from benchmarks.digits import ablation_deft

    with pytest.raises(SystemExit):
        ablation_deft.main(["--variants", "mixture,colour"])
    assert "unknown variant" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teachers", "clip"], "--teachers must list some of"),
        (["--ratios", "0.25,2"], "--ratios must be numbers in (0, 1]"),
        (["--n", "0"], "--n must be >= 1"),
        (["--train-images", "0"], "--train-images must be >= 1"),
    ],
)
def test_warm_start_benchmark_rejects_bad_input(argv, message, capsys, tmp_path):
    from benchmarks.digits import warm_start_eval

    with pytest.raises(SystemExit):
        warm_start_eval.main([*argv, "--out", str(tmp_path / "w.json"), "--work-dir", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()


@pytest.mark.slow
def test_warm_start_benchmark_runs_end_to_end(tmp_path):
    """convert -> warm start (both teachers) -> accuracy rows, on a few canvases (about a minute)."""
    from benchmarks.digits import warm_start_eval

    out = tmp_path / "w.json"
    argv = ["--n", "20", "--steps", "3", "--train-images", "40", "--agreement-images", "20", "--threads", "1"]
    warm_start_eval.main([*argv, "--out", str(out), "--work-dir", str(tmp_path / "work")])
    results = json.loads(out.read_text())
    methods = {r["method"] for r in results["rows"]}
    assert {"deft (random init)", "deft (warm start: divprune)", "visionzip_dominant", "divprune"} <= methods
    assert set(results["teacher_agreement"]) == {"cls_attention", "divprune"}
    assert all(0 <= r["accuracy"] <= 1 for r in results["rows"])


def test_speed_ideal_counts_the_tokens_each_layer_runs_not_the_placeholders(tmp_path):
    """CDPruner writes all N placeholders and re-packs to K before the language model: its ideal is K's (it
    was N's, which showed "154% of ideal"); a method that prunes inside the decoder counts each layer."""
    out = tmp_path / "speed.json"
    speed_memory.main(
        ["--shape", "tiny", "--methods", "deft,cdpruner", "--ratios", "0.25", "--repeats", "1"]
        + ["--decode-tokens", "2", "--no-cpu-memory", "--out", str(out)]
    )
    rows = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert rows["cdpruner"]["placeholders"] == 64 and rows["cdpruner"]["kept_tokens"] == 16
    assert rows["cdpruner"]["ideal_speedup"] == rows["deft"]["ideal_speedup"] > 1
    assert rows["cdpruner"]["layer_tokens"] == rows["deft"]["layer_tokens"]
    text = speed_memory.load_config("tiny").text_config
    full, kept = speed_memory.TEXT_TOKENS + 64, speed_memory.TEXT_TOKENS + 16
    mixed = speed_memory.lm_flops(text, [full, kept])  # FastV-like: all N in layer 1, K in layer 2
    assert speed_memory.lm_flops(text, kept) < mixed < speed_memory.lm_flops(text, full)


def test_evaluate_config_counts_the_folders_own_budget():
    """A DeFT folder evaluated without settings keeps its saved K (16 of 64 for the shipped checkpoint at 25%):
    the visual-token count was read from the settings alone, so it said 64."""
    from benchmarks.digits.common import TEST_SEED
    from benchmarks.digits.evaluate_methods import evaluate_config
    from benchmarks.digits.tasks import TASKS

    task = TASKS["easy"]
    samples = task.make_split("test", 2, seed=TEST_SEED)
    out = evaluate_config(task.deft_checkpoint, {}, samples, task, batch_size=2)
    assert out["mean_visual_tokens"] == 16.0
