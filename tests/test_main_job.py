"""The main job and its compression-cost companion print what the README reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/


def test_main_job_prints_the_saving_and_the_compression_share(capsys, tmp_path):
    from benchmarks.digits import main_job

    main_job.main(["--n", "2", "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "kept.png")])
    out = capsys.readouterr().out
    assert "time saved" in out
    share = [line for line in out.splitlines() if "compression step" in line]
    assert len(share) == 1 and "of the full-token prefill" in share[0] and "1 threads" in share[0]
    assert (tmp_path / "kept.png").exists()


def test_main_job_rejects_bad_threads(capsys):
    from benchmarks.digits import main_job

    with pytest.raises(SystemExit):
        main_job.main(["--threads", "0"])
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_compression_cost_reports_the_share_of_the_full_token_prefill(capsys):
    from benchmarks.digits import compression_cost

    compression_cost.main(["--rounds", "1", "--calls", "1"])
    out = capsys.readouterr().out
    assert "compression step =" in out and "of the full-token prefill" in out
    with pytest.raises(SystemExit):
        compression_cost.main(["--rounds", "0"])
    assert "--rounds and --calls must be >= 1" in capsys.readouterr().err


def test_compressed_and_full_prefills_alternate():
    # measured one side after the other, a burst of load once made the compressed side 30x slower in a whole
    # run of the main job (-3135% "saved"); alternating runs share any burst
    import tiny
    from modeling_deft_llava.commands.visualize import paired_prefill_seconds
    from test_model import batch_inputs

    settings = dict(use_deft=True, deft_retention_ratio=0.25)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    full = batch_inputs(tiny.processor(use_deft=False))
    seen = []
    original = model.forward

    def recording(**kwargs):
        seen.append((kwargs["input_ids"].shape[1], model.model.compression_active))
        return original(**kwargs)

    model.forward = recording
    on, off = paired_prefill_seconds(model, inputs, full, repeats=2)
    short, long = inputs["input_ids"].shape[1], full["input_ids"].shape[1]
    assert seen == [(short, True), (long, False)] * 3  # warm-up + 2 repeats, alternating
    assert on > 0 and off > 0 and isinstance(on, float)


def test_main_job_imports_warn_of_nothing():
    """The shipped processors run on the PIL backend; naming transformers' `CLIPImageProcessor` without torchvision
    printed a fallback notice on every run of the main job (a warning that was ours to fix)."""
    import subprocess

    code = "import sys; sys.path.insert(0, 'tests'); import benchmarks.digits.main_job, tiny, tiny_next; tiny_next.image_processor()"
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "torchvision" not in run.stderr and "Warning" not in run.stderr, run.stderr
