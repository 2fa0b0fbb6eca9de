"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path_for(final: Path) -> Path:
    """The hidden temporary name a write to ``final`` goes through (same folder, so rename is atomic)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: str | os.PathLike, write: Callable[[Path], object], *, durable: bool = True) -> Path:
    """Run ``write(tmp_path)``, then rename the temporary file over ``final``.

    With ``durable`` the file and its folder are fsync'ed, so the new content
    also survives a power cut, not just a crash. The file gets the usual
    permissions (umask applies), like any file the user writes. On any error
    the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)
    return final
