"""Configuration: `DeftLlavaConfig`, the DeFT settings record (single source of every default) and presets.

Installed as `modeling_deft_llava.configuration`. `deft_settings.py` (the settings, their defaults and the one
rounding rule) is data: it imports nothing of the project. The config classes ask the placeholder policy and the
method checks (`modeling_deft_llava/compressors/placeholder_policy.py`), which sit above the data.
"""

from .deft_settings import DEFAULTS, DeftSettings, num_kept_tokens, validate_deft_settings

__all__ = ["DEFAULTS", "DeftSettings", "num_kept_tokens", "validate_deft_settings"]
