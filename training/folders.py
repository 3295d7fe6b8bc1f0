"""`check_readable_folder`: a model folder the user cannot read is reported as such, not as a folder that "has no
config.json" (`os.path.isfile` answers False for a file in a folder without read/search permission)."""

from __future__ import annotations

import os


def check_readable_folder(folder, what: str = "model folder") -> None:
    """`folder` exists, is a folder, and this user may list it and read its config.json (when it has one).

    Raises:
        ValueError: names the folder and what is wrong (missing, not a folder, no permission).
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise ValueError(f"{what} {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {folder!r} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(
            f"{what} {folder!r} cannot be read by this user (no read/search permission on the folder): give the "
            f"user access (chmod -R u+rX {folder!r}, or run as its owner)"
        )
    config = os.path.join(folder, "config.json")
    if os.path.lexists(config) and not os.access(config, os.R_OK):
        raise ValueError(
            f"{what} {folder!r}: its config.json cannot be read by this user (no read permission): give the user "
            f"access (chmod -R u+rX {folder!r}, or run as its owner)"
        )


__all__ = ["check_readable_folder"]
