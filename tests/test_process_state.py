"""Entry points called in-process leave torch's process-wide settings as they found them (item 2 of issue 24)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from modeling_deft_llava.utilities.process_state import restores_process_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/


def _settings():
    return (
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
        os.environ.get("DEFT_PROCESS_STATE_TEST"),
        os.getcwd(),
    )


@pytest.mark.parametrize("raises", [False, True])
def test_a_decorated_entry_point_restores_what_it_changed(raises, tmp_path):
    @restores_process_state
    def main():
        torch.set_num_threads(torch.get_num_threads() + 1)
        torch.set_grad_enabled(False)
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(1234)
        os.environ["DEFT_PROCESS_STATE_TEST"] = "1"
        os.chdir(tmp_path)
        if raises:
            raise RuntimeError("user error")
        return "result"

    before, rng = _settings(), torch.get_rng_state()
    if raises:
        with pytest.raises(RuntimeError, match="user error"):
            main()
    else:
        assert main() == "result"
    assert _settings() == before
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_compression_cost_benchmark_leaves_the_thread_count_alone(capsys):
    """It runs with one thread; before, the caller kept one thread afterwards."""
    from benchmarks.digits import compression_cost

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, whatever this machine's default
    try:
        compression_cost.main(["--rounds", "1", "--calls", "1"])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert "compression step =" in capsys.readouterr().out
