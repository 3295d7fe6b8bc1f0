"""Configuration: `DeftLlavaConfig`, the DeFT settings record (single source of every default) and presets.

Installed as `modeling_deft_llava.configuration`. Imports only transformers and the standard library.
"""

from .deft_settings import DEFAULTS, DeftSettings, num_kept_tokens, validate_deft_settings

__all__ = ["DEFAULTS", "DeftSettings", "num_kept_tokens", "validate_deft_settings"]
