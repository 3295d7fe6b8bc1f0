"""`benchmarks/cpu_memory.py` reads CPU peak memory honestly: known allocations show up at their size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root holds benchmarks/

from benchmarks import cpu_memory  # noqa: E402

MB = 2**20
SLACK = MB  # unrelated pages (interpreter, allocator) may be returned or touched during the work

# run in a fresh process with the fixed malloc threshold, as the benchmark's probes are
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from benchmarks import cpu_memory

def held():  # 64 MB alive after the work
    return torch.ones(64 * 2**20 // 4)

def temporary():  # 96 MB at the peak, 32 MB left
    big = torch.ones(64 * 2**20 // 4)
    small = torch.ones(32 * 2**20 // 4)
    del big
    return small

# 200 MB allocated and freed before the measurement: glibc's dynamic threshold would let later blocks below
# 32 MB reuse freed heap memory without growing the resident size; many 8 MB blocks test exactly that
junk = [torch.ones(8 * 2**20 // 4) for _ in range(25)]
del junk

def many_small():  # 12 x 8 MB alive at once
    return [torch.ones(8 * 2**20 // 4) for _ in range(12)]

out = {{}}
for name, fn in (("held", held), ("temporary", temporary), ("many_small", many_small)):
    fn()  # warm-up, as the benchmark does
    result, mem = cpu_memory.measure(fn)
    del result
    out[name] = mem
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def readings(tmp_path_factory):
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE.format(root=str(ROOT)))
    return cpu_memory.run_in_subprocess([str(script)], timeout=300)


def test_a_tensor_held_after_the_work_shows_up_at_its_size(readings):
    mem = readings["held"]
    assert 64 * MB - SLACK <= mem["peak_growth_bytes"] < 64 * MB + 8 * MB
    assert 64 * MB - SLACK <= mem["retained_bytes"] < 64 * MB + 8 * MB


def test_a_temporary_tensor_counts_in_the_peak_only(readings):
    mem = readings["temporary"]
    assert 96 * MB - SLACK <= mem["peak_growth_bytes"] < 96 * MB + 8 * MB
    assert 32 * MB - SLACK <= mem["retained_bytes"] < 32 * MB + 8 * MB


def test_blocks_allocated_after_large_frees_show_at_their_size(readings):
    mem = readings["many_small"]
    assert 96 * MB - SLACK <= mem["peak_growth_bytes"] < 96 * MB + 8 * MB


def test_measure_refuses_a_process_without_the_fixed_malloc_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(RuntimeError, match="MALLOC_MMAP_THRESHOLD_"):
        cpu_memory.measure(lambda: None)


def test_a_failing_probe_names_its_exit_code_and_stderr(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys; sys.stderr.write('boom'); sys.exit(3)")
    with pytest.raises(RuntimeError, match=r"exit code 3(.|\n)*boom"):
        cpu_memory.run_in_subprocess([str(script)])
