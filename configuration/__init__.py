"""Configuration: `DeftLlavaConfig`, the DeFT settings record (single source of every default) and presets.

Installed as `modeling_deft_llava.configuration`. Imports transformers and the standard library; method names,
settings and placeholder policies come from the registry of methods (`modeling_deft_llava/compressors/`),
imported inside the functions that validate a config.
"""

from .deft_settings import DEFAULTS, DeftSettings, num_kept_tokens, validate_deft_settings

__all__ = ["DEFAULTS", "DeftSettings", "num_kept_tokens", "validate_deft_settings"]
