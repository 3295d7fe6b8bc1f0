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
