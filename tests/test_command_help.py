"""Every command's `--help` answers without the optional integrations installed: a help text that crashed
(`%` unescaped in argparse help) or a wrapper that crashed on a missing package reached a new user as a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["benchmarks.vllm_throughput"])
def test_help_answers(module):
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "usage:" in run.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: the wrapper runs vLLM's CLI"
)
def test_the_vllm_wrapper_without_vllm_names_the_install():
    run = subprocess.run(
        [sys.executable, "-m", "modeling_deft_llava.serving.vllm_cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "error: deft-llava-vllm runs vLLM's command line" in run.stderr
    assert "Traceback" not in run.stderr


def test_convert_arguments_all_have_help(capsys):
    """`convert --help` named its arguments without saying what they are or which default applies."""
    from modeling_deft_llava.commands import convert

    with pytest.raises(SystemExit):
        convert.main(["--help"])
    out = capsys.readouterr().out
    for name in ("stock_folder", "out_folder", "--overwrite", "--no-deft", "--deft-retention-ratio"):
        line = next(i for i, text in enumerate(out.splitlines()) if text.strip().startswith(name))
        rest = out.splitlines()[line].strip()[len(name) :].strip() or out.splitlines()[line + 1].strip()
        assert rest and not rest.startswith("-"), f"{name} has no help text"
    assert "source folder's, else" in out
