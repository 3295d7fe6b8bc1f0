"""Kill-safe folder writes, shared by every writer of the project (checkpoints, the final adapter, `convert`,
`export_for_hub`, `publish --dry-run`). Standard library only.

The protocol: a folder is built under a hidden name next to its target, then renamed into place.

- `staged(target)`: a private staging folder `.<name>.staging-<random>`, locked (`flock`) while its writer lives,
  removed if the writer fails.
- `mark_complete(folder)`: after every file is written and synced, `save_complete.json` is written last, listing
  each file and its size; `is_complete(folder)` checks the folder against it. Completeness is a matter of content:
  a folder is never trusted for its name.
- `place(staged, target, overwrite)`: a new target is one `rename(2)`, which also refuses a target that another
  program filled meanwhile (never deleting its files). Replacing a target swaps the two folders with one
  `renameat2(RENAME_EXCHANGE)` (Linux), so the target name holds the old complete folder or the new one at every
  instant; where the file system has no exchange, the old folder is renamed aside (`.<name>.old-<random>`) and
  the new one renamed in: a kill between the two renames leaves no folder under the name, and `recover` puts the
  old one back.
- `remove_tree(path)`: renamed to `.<name>.trash-<random>` first, then deleted: a kill part-way never leaves a
  half-deleted folder under a real name.
- `recover(target)`: run by each writer before it writes: puts an aside folder back when the target is
  missing, deletes trash, and deletes staging folders whose writer is gone (their lock is free).

Guarantee: a SIGKILL at any point leaves the old complete folder or the new complete one, plus hidden leftovers
that the next writer of the same target removes. Files are fsynced before the marker and renames, so the same
holds after a power cut on file systems that honour `fsync`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

try:  # advisory locks tell a live writer's staging folder from a killed one's (not on Windows)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MARKER = "save_complete.json"
STAGING, ASIDE, TRASH = "staging", "old", "trash"
_LOCKS: dict[str, int] = {}  # staging folder -> open descriptor holding its lock


# ------------------------------------------------------------------------------------------ names and syncing
def hidden_prefix(target, kind: str) -> str:
    """`.<name>.<kind>-`: the prefix of the hidden folders of `kind` that belong to `target`."""
    return f".{Path(target).name}.{kind}-"


def hidden_path(target, kind: str) -> Path:
    """A fresh hidden path of `kind` next to `target` (not created)."""
    target = Path(target)
    return target.parent / f"{hidden_prefix(target, kind)}{os.getpid()}-{secrets.token_hex(4)}"


def owner_name(name: str) -> str | None:
    """The target name a hidden `.<name>.<kind>-<suffix>` entry belongs to (None for other names)."""
    for kind in (STAGING, ASIDE, TRASH):
        head, sep, suffix = name.rpartition(f".{kind}-")
        if sep and head.startswith(".") and len(head) > 1 and suffix and "." not in suffix:
            return head[1:]
    return None


def fsync_dir(path) -> None:
    """Make the renames and creations inside folder `path` durable (no-op where folders cannot be synced)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _fsync_file(path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


# ------------------------------------------------------------------------------------------ completeness
def mark_complete(folder, **info) -> None:
    """Sync every file of `folder`, then write `save_complete.json` (files and sizes, plus `info`) last."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        _fsync_file(path)
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    for sub in sorted({p.parent for p in _files(folder)} | {folder}, reverse=True):
        fsync_dir(sub)
    text = json.dumps({**info, "files": files}, indent=1, sort_keys=True)
    partial = folder / f".{MARKER}.partial"
    partial.write_text(text, encoding="utf-8")
    _fsync_file(partial)
    os.replace(partial, folder / MARKER)
    fsync_dir(folder)


def marker(folder) -> dict | None:
    """The parsed `save_complete.json` of `folder`, or None."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(folder) -> bool:
    """`folder` has its marker and every file the marker lists, at its size."""
    folder = Path(folder)
    listed = (marker(folder) or {}).get("files")
    if not isinstance(listed, dict):
        return False
    for name, size in listed.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------------------ staging
def _lock(folder: Path) -> None:
    if fcntl is None:
        return
    handle = os.open(folder, os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX)
    _LOCKS[str(folder)] = handle


def _unlock(folder: Path) -> None:
    handle = _LOCKS.pop(str(folder), None)
    if handle is not None:
        os.close(handle)


def _writer_gone(folder: Path) -> bool:
    """Nobody holds the lock of staging folder `folder` (its writer was killed, or never locked it)."""
    if str(folder) in _LOCKS:
        return False
    if fcntl is None:
        return False  # cannot tell: leave it
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(handle)  # closing drops the lock we may have taken
    return True


@contextmanager
def run_lock(target):
    """`with run_lock(folder):` one writer at a time for `folder` (a training run's `output_dir`).

    Takes an exclusive advisory lock (`flock`) on the hidden file `.<name>.run-lock` next to `folder`, held until
    the block ends (a killed holder's lock is released by the kernel). The file records the holder's process id.

    Raises:
        RuntimeError: another live process holds the lock (names the folder and that process).
    """
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks, no protection
        yield
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.run-lock"
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        raise RuntimeError(
            f"another run is writing into {str(target)!r} (process {holder}, lock {str(path)!r}); wait for it to "
            "finish or choose another output_dir"
        ) from None
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(handle)  # closing drops the lock


def new_staging(target) -> Path:
    """Create and lock a private staging folder next to `target` (ordinary permissions)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=hidden_prefix(target, STAGING), dir=target.parent))
    folder.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    _lock(folder)
    return folder


@contextlib.contextmanager
def staged(target):
    """`with staged(target) as folder:` a locked staging folder next to `target` (after `recover(target)`);
    removed on the way out unless it was placed."""
    recover(target)
    folder = new_staging(target)
    try:
        yield folder
    finally:
        _unlock(folder)
        if folder.exists():
            remove_tree(folder, owner=target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ moves
def _exchange(source, target) -> bool:
    """Swap two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, ImportError):
        return False
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(error, os.strerror(error), str(source), None, str(target))


def place(staged_folder, target, overwrite: bool = False) -> None:
    """Move the complete folder `staged_folder` to `target`.

    Without `overwrite`, `target` must be missing or an empty folder, and stays untouched if it is not (another
    program may have written into it since it was checked). With `overwrite`, the old target is replaced and then
    deleted; the name holds a complete folder at every instant where the exchange exists (module docstring).

    Raises:
        FileExistsError: `target` holds files and `overwrite` is False.
    """
    staged_folder, target = Path(staged_folder), Path(target)
    try:
        _place(staged_folder, target, overwrite)
    finally:
        _unlock(
            staged_folder
        )  # held until here: a concurrent `recover` must not take it for a killed writer's


def _place(staged_folder: Path, target: Path, overwrite: bool) -> None:
    if not overwrite or not target.exists():
        try:
            os.rename(staged_folder, target)  # onto a missing or empty folder; refused for a non-empty one
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise FileExistsError(
                    f"{target} is not empty (another program may have written into it); nothing was replaced"
                ) from error
            raise
        fsync_dir(target.parent)
        return
    if _exchange(staged_folder, target):
        fsync_dir(target.parent)
        remove_tree(staged_folder, owner=target)  # now holds the old folder
        return
    aside = hidden_path(target, ASIDE)
    os.rename(target, aside)
    try:
        os.rename(staged_folder, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_dir(target.parent)
    remove_tree(aside, owner=target)


def remove_tree(path, owner=None) -> None:
    """Delete folder `path`: renamed to a hidden trash name first (`.<owner name>.trash-...`, `owner` defaulting to
    `path`, so that `recover(owner)` finds it), so a kill never leaves it half-deleted under a real name."""
    path = Path(path)
    if not path.exists():
        return
    trash = hidden_path(owner if owner is not None else path, TRASH)
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def recover(target) -> list[str]:
    """Clean up after killed writers of `target`; returns what was done, one line per folder.

    An aside folder is renamed back when `target` is missing (the old complete folder), extra asides and trash
    are deleted, and staging folders whose writer is gone are deleted (a live writer's stay)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    done = []
    entries = sorted(parent.iterdir(), key=lambda p: p.name)
    asides = [p for p in entries if p.name.startswith(hidden_prefix(target, ASIDE))]
    if asides and not target.exists():
        newest = max(asides, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, target)
        fsync_dir(parent)
        done.append(f"restored {target.name} from {newest.name}")
        asides.remove(newest)
    for path in asides + [p for p in entries if p.name.startswith(hidden_prefix(target, TRASH))]:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"deleted {path.name}")
    for path in entries:
        if path.name.startswith(hidden_prefix(target, STAGING)) and path.exists() and _writer_gone(path):
            remove_tree(path, owner=target)
            done.append(f"deleted {path.name}")
    return done


def recover_all(parent) -> list[str]:
    """`recover` every target of folder `parent` that has hidden leftovers."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    owners = sorted({name for p in parent.iterdir() if (name := owner_name(p.name))})
    return [line for name in owners for line in recover(parent / name)]


__all__ = [
    "MARKER",
    "fsync_dir",
    "hidden_path",
    "is_complete",
    "mark_complete",
    "marker",
    "new_staging",
    "owner_name",
    "place",
    "recover",
    "recover_all",
    "remove_tree",
    "staged",
]
