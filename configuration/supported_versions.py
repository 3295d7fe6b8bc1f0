"""The transformers (and peft) versions DeFT-LLaVA is tested with, and the import-time guard.

These constants are the single source of the supported range: `pyproject.toml` states the same bounds (a test
compares them), `.ci/run` runs the default suite on the lowest and on the newest tested versions, and the model
card prints them. Every place where the code relies on transformers internals is listed in
`modeling_deft_llava/transformers_compat.py`: a new release is checked there first.

Importing any entry module of the model (configuration, modeling, processing), here or in a folder written by
`export_for_hub` and loaded with `trust_remote_code=True`, runs `check_transformers_version()`:

- a release older than `TRANSFORMERS_MIN`, or one listed in `KNOWN_BROKEN`, raises an `ImportError` naming the
  installed version and the tested range, instead of failing deep inside `forward`;
- a release newer than the tested range gets one warning naming the tested range (transformers' logger
  `transformers.deft_llava`, `warning_once`: once per process, although transformers imports a separate copy of
  this file for the config, the processor and the model of a Hub folder), and the code runs. An exported folder carries this file, so a model published today keeps
  loading under later transformers releases instead of refusing them forever.
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers.utils import logging

# lowest tested release (inclusive) and the first untested minor release (exclusive upper bound of the tested range)
TRANSFORMERS_MIN = "5.18.0"
TRANSFORMERS_BELOW = "5.26"
PEFT_MIN = "0.20.0"
PEFT_BELOW = "0.22"
# releases at or above TRANSFORMERS_MIN that are known to break the model: {exact release: why}. Refused like a
# release below the minimum. Development builds count as their release (`5.30.0.dev0` is `5.30.0`).
KNOWN_BROKEN: dict[str, str] = {}

# one name in every copy of this file: `warning_once` then warns once per process, not once per copy
logger = logging.get_logger("transformers.deft_llava")


def supported_transformers_range() -> str:
    """The tested range in pip's notation, e.g. `>=5.18.0,<5.26`."""
    return f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"


def check_transformers_version(installed: str | None = None) -> None:
    """Refuse a too old or known-broken transformers; warn once about a newer, untested one.

    Development builds of a release (`5.24.0.dev0`) count as that release.

    Args:
        installed: the version to check (default: the imported transformers).

    Raises:
        ImportError: the release is older than `TRANSFORMERS_MIN` or listed in `KNOWN_BROKEN`; names the
            installed version and `supported_transformers_range()`.

    Warns:
        the release is at or above `TRANSFORMERS_BELOW`: one `logger.warning_once` per process and version,
        naming the installed version and the tested range.
    """
    installed = transformers.__version__ if installed is None else installed
    release = Version(Version(installed).base_version)
    tested = supported_transformers_range()
    fix = f"run `pip install 'transformers{tested}'`"
    if release < Version(TRANSFORMERS_MIN):
        raise ImportError(
            f"DeFT-LLaVA supports transformers {tested}, but transformers {installed} is installed "
            f"(older than {TRANSFORMERS_MIN}); {fix}"
        )
    broken = {Version(v): why for v, why in KNOWN_BROKEN.items()}
    if release in broken:
        raise ImportError(
            f"DeFT-LLaVA supports transformers {tested}, but transformers {installed} is installed, a release "
            f"known to break it ({broken[release]}); {fix}"
        )
    if release >= Version(TRANSFORMERS_BELOW):
        logger.warning_once(
            f"DeFT-LLaVA is tested with transformers {tested}; transformers {installed} is newer and untested. "
            f"The model runs, but if it fails or its outputs look wrong, {fix} and report it."
        )


check_transformers_version()

__all__ = [
    "KNOWN_BROKEN",
    "PEFT_BELOW",
    "PEFT_MIN",
    "TRANSFORMERS_BELOW",
    "TRANSFORMERS_MIN",
    "check_transformers_version",
    "supported_transformers_range",
]
