"""Writing result files so that a crash or a full disk never leaves a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from llmtailor.errors import UserError

T = TypeVar("T")


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[tuple[int, Path]]:
    """A temporary file beside `path` (open descriptor and path), renamed over `path` when the block succeeds
    and deleted when it fails. It gets the mode an ordinary ``open`` would give (0666 less the umask), not the
    0600 of a temporary file: results are files the user shares."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        yield fd, Path(staging)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_text(path: Path, content: str) -> None:
    """Write a text file atomically: to a temporary file beside it, then rename over it."""
    with _staged(path) as (fd, _), os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)


def write_with(path: Path, save: Callable[[Path], None]) -> None:
    """Write a file atomically with a function that saves to a given path (such as safetensors' save_file)."""
    with _staged(path) as (fd, staging):
        os.close(fd)
        save(staging)
        # safetensors 0.8 writes a temporary file of its own and renames it over ours, so the file is new and 0600
        # again: a cache other users of a shared folder could not read.
        os.chmod(staging, 0o666 & ~umask())


def usual_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes an ordinary ``open`` and ``mkdir`` give (0666 and 0777 less the
    umask). For folders written by libraries that leave some files 0600 (transformers' ``save_pretrained`` through
    safetensors) before they are renamed into a cache that other users of the machine share."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root, name), 0o777 & ~mask)
        for name in names:
            os.chmod(Path(root, name), 0o666 & ~mask)


def load_or_make(path: Path, read: Callable[[Path], T], make: Callable[[], T], write: Callable[[T, Path], None],
                 reread: bool = False) -> T:
    """What `read(path)` gives; where the file is missing or unreadable, `make()`'s value, first stored at `path` by
    `write(value, path)` (which writes atomically, so a killed writer leaves no half file; an unreadable file, left by
    a filesystem without atomic rename or an older format, is deleted and made again). With `reread`, the stored
    form is returned in place of the made value (where it is lighter: tensors left in the file)."""
    if path.is_file():
        try:
            return read(path)
        except Exception:
            path.unlink(missing_ok=True)
    made = make()
    write(made, path)
    return read(path) if reread else made


def replace_folder(path: Path, contents: dict[str, str]) -> None:
    """Make `path` a folder holding exactly `contents` (file name -> text), swapping it in whole.

    The new folder is written beside the old one and renamed into place, so a crash
    leaves either the old folder or the new one, never a mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    old = path.parent / f".{path.name}.old"
    try:
        os.chmod(staging, 0o777 & ~umask())
        for name, text in contents.items():
            write_text(staging / name, text)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def first_missing(path: Path | None) -> Path | None:
    """The outermost folder (or file) on the way to `path` that does not exist yet; None if `path` exists."""
    if path is None or path.exists():
        return None
    path = path.absolute()
    while not path.parent.exists():
        path = path.parent
    return path


def check_writable_folder(path: Path | str, what: str) -> None:
    """Raise UserError unless `path` is a folder that exists and is writable, or could be created.

    Nothing stays behind: the check creates a temporary folder in the nearest existing
    ancestor and removes it at once.
    """
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create the {what} {target}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".llmtailor-write-check-"))
    except OSError as exc:
        raise UserError(f"cannot write the {what} {target}: creating a folder in {existing} fails "
                        f"({exc.strerror or exc}); choose a folder you can write") from None
