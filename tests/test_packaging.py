"""A plain wheel holds only the project's namespace and works without the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMOKE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path[:] = [p for p in sys.path if "site-packages" in p or not p.startswith({repo!r})]
sys.path.insert(0, {target!r})
import modeling_deft_llava, torch
assert modeling_deft_llava.__file__.startswith({target!r}), modeling_deft_llava.__file__
from modeling_deft_llava import DeFTModule, DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.configuration import DEFAULTS
from modeling_deft_llava.training.train import parse_args
from modeling_deft_llava.hub_card.export import export_for_hub
out = DeFTModule(token_dim=8, semantic_dim=4)(tokens=torch.randn(1, 4, 8), modality="image", spatial_shape=(2, 2))
print("ok", out.retained_tokens.shape[1], DEFAULTS.deft_retention_ratio)
"""


def test_wheel_contents_and_install(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {
        "modeling_deft_llava",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }
    for sub in ("configuration", "processing", "training", "hub_card"):
        assert f"modeling_deft_llava/{sub}/__init__.py" in names  # the design-card folders, namespaced
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = subprocess.run(
        [sys.executable, "-c", SMOKE.format(repo=str(REPO), target=str(target))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok 2 0.482")
