"""Checks that an output file can be written, made before any slow work, each a one-line refusal."""

from __future__ import annotations

import os
from pathlib import Path

from dit_client.dit_config import ClientConfigError


def check_output_file(path: str | os.PathLike, *, suffix: str | None = None, flag: str = "--out") -> Path:
    """``path`` as a Path, or :class:`ClientConfigError` naming the fix.

    Refuses a name without ``suffix`` (when given), an existing folder, and a path under a file or under a
    folder this process cannot write to (the file is written through a temp file beside it;
    missing folders are created then).
    """
    out = Path(path)
    if out.is_dir():
        raise ClientConfigError(
            f"{flag} {out} is a folder; name a file inside it, e.g. {out / ('out' + (suffix or ''))}"
        )
    if suffix is not None and out.suffix.lower() != suffix:
        raise ClientConfigError(f"output file {out} must end in {suffix}")
    # Missing folders are created on writing; the nearest existing one must take new entries.
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ClientConfigError(f"{flag} {out}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClientConfigError(
            f"{flag} {out}: cannot write to the folder {parent} (permission denied); choose another path"
        )
    if out.exists() and not os.access(out, os.W_OK):
        raise ClientConfigError(f"{flag} {out}: the file exists and is read-only; choose another path")
    return out
