"""Crash-safe file output: write to a temporary sibling, rename into place when complete.

A reader therefore sees either the previous complete file or the new complete file, never a
half-written one, and a killed stage leaves only ``*.tmp`` debris that the next run overwrites.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A unique temporary name in the same directory as ``path`` (same filesystem, so rename is atomic)."""
    target = Path(path)
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")


def _process_umask() -> int:
    """The process's file-mode creation mask (``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain ``open``/``mkdir`` would: ``0o666``
    (``0o777`` for folders and executables) less the umask. Writers that create files ``0600`` themselves
    (safetensors' ``save_file``, ``tempfile``) would otherwise leave outputs collaborators cannot read."""
    mask = _process_umask()
    target = Path(path)
    entries = [target, *target.rglob("*")] if target.is_dir() else [target]
    for entry in entries:
        if entry.is_symlink():
            continue
        executable = entry.is_dir() or entry.stat().st_mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success rename it to ``path``, on error delete it.

    Works for files and directories alike (a directory is moved into place whole). What is moved into
    place has the modes the user's umask gives (:func:`follow_umask`), whatever the writer chose.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(target)
    try:
        yield temporary
        follow_umask(temporary)
        if target.is_dir() and temporary.is_dir():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=json_default) + "\n")


def write_dataframe(path: str | os.PathLike, frame: "Any") -> None:
    """Write a pandas DataFrame atomically, as Parquet or CSV by the file suffix."""
    target = Path(path)
    with atomic_path(target) as temporary:
        if target.suffix == ".parquet":
            frame.to_parquet(temporary, index=False)
        elif target.suffix == ".csv":
            frame.to_csv(temporary, index=False)
        else:
            raise ValueError(f"write_dataframe: unsupported suffix {target.suffix!r} for {target}")


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy/torch values and paths: arrays and tensors become lists,
    scalars Python numbers, paths strings."""
    if hasattr(value, "tolist"):  # arrays and tensors (a 0-d one gives a plain number), numpy scalars
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
