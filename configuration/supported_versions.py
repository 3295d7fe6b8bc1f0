"""The transformers (and peft) versions DeFT-LLaVA is tested with, and the import-time guard.

These constants are the single source of the supported range: `pyproject.toml` states the same bounds (a test
compares them), `.ci/run` runs the default suite on the lowest and on the newest admitted versions, and the model
card prints them. Every place where the code relies on transformers internals is listed in
`modeling_deft_llava/transformers_compat.py`: a new release is checked there first.

Importing any entry module of the model (configuration, modeling, processing), here or in a folder written by
`export_for_hub` and loaded with `trust_remote_code=True`, runs `check_transformers_version()`: outside the range
it raises an `ImportError` naming the installed version and the range, instead of failing deep inside `forward`.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

# lowest tested release (inclusive) and the first untested minor release (exclusive upper bound)
TRANSFORMERS_MIN = "5.18.0"
TRANSFORMERS_BELOW = "5.25"
PEFT_MIN = "0.20.0"
PEFT_BELOW = "0.22"


def supported_transformers_range() -> str:
    """The supported range in pip's notation, e.g. `>=5.16.1,<5.25`."""
    return f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise `ImportError` when `installed` (default: the imported transformers) is outside the tested range.

    Development builds of a supported release (`5.24.0.dev0`) count as that release.

    Raises:
        ImportError: names the installed version and `supported_transformers_range()`.
    """
    installed = transformers.__version__ if installed is None else installed
    release = Version(Version(installed).base_version)
    if not Version(TRANSFORMERS_MIN) <= release < Version(TRANSFORMERS_BELOW):
        raise ImportError(
            f"DeFT-LLaVA supports transformers {supported_transformers_range()}, but transformers {installed} "
            f"is installed; run `pip install 'transformers{supported_transformers_range()}'`"
        )


check_transformers_version()

__all__ = [
    "PEFT_BELOW",
    "PEFT_MIN",
    "TRANSFORMERS_BELOW",
    "TRANSFORMERS_MIN",
    "check_transformers_version",
    "supported_transformers_range",
]
