"""Config-time validation of the baseline compression methods' names and settings."""

from __future__ import annotations


def validate_method(name: str, settings: dict | None) -> None:
    """Raise ValueError for an unknown method or invalid settings (filled in by the baselines registry)."""
    raise ValueError(f"compression_method must be 'deft' (baselines are not available yet), got {name!r}")
