"""API keys: the keys file, constant-time key checks, and who a caller is.

The keys file has one ``user:key`` per line; ``#`` starts a comment line.
With a keys file every TextEncoder call must carry ``authorization: Bearer KEY``
metadata; without one every caller is the user ``anonymous``. Where this is
applied, and in which order with the other limits, is the request policy's
business (encoder_server/admission.py). See docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from common.errors import Unauthenticated
from encoder_server.identity import ANONYMOUS, current_user
from encoder_server.text_encoder import ConfigError

log = logging.getLogger(__name__)

# Long enough that guessing is hopeless; `secrets.token_urlsafe(32)` gives 43.
MIN_KEY_CHARS = 16
# User names end up in logs and metric labels: keep them short and plain.
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class KeyFileError(ConfigError):
    """The API keys file is missing, unreadable or malformed (the CLI exits with code 2)."""


# -- keys ----------------------------------------------------------------


def load_api_keys(path: str | os.PathLike) -> dict[str, str]:
    """Read ``user:key`` lines from ``path``; return ``{user: key}``.

    Blank lines and lines whose first non-blank character is ``#`` are skipped.
    The key is everything after the first ``:``. Raises :class:`KeyFileError`
    naming the file and line for anything else.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"API keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read API keys file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API keys file %s is readable by other local users; chmod 600 it", path)

    keys: dict[str, str] = {}
    owner_of_key: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {lineno}"
        user, sep, key = line.partition(":")
        user, key = user.strip(), key.strip()
        if not sep:
            raise KeyFileError(f"{where}: expected 'user:key', found no ':'")
        if not _USER_RE.fullmatch(user):
            raise KeyFileError(
                f"{where}: user name {user!r} must be 1-64 characters of letters, digits, '.', '_', '@' or '-', "
                "starting with a letter or digit"
            )
        if not key:
            raise KeyFileError(f"{where}: user {user!r} has an empty key")
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise KeyFileError(
                f"{where}: the key of {user!r} must be printable ASCII without spaces "
                "(comments go on their own line, starting with '#')"
            )
        if len(key) < MIN_KEY_CHARS:
            raise KeyFileError(
                f"{where}: the key of {user!r} has {len(key)} characters; use at least {MIN_KEY_CHARS} "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes a good one)"
            )
        if user in keys:
            raise KeyFileError(f"{where}: user {user!r} appears twice")
        if key in owner_of_key:
            raise KeyFileError(f"{where}: {user!r} has the same key as {owner_of_key[key]!r}; give each user their own")
        keys[user] = key
        owner_of_key[key] = user
    if not keys:
        raise KeyFileError(f"API keys file {path} holds no 'user:key' line, so nobody could call the server")
    return keys


class KeyStore:
    """Maps API keys to user names, comparing in constant time.

    Keys are kept only as SHA-256 digests, so every comparison is between two
    32-byte strings whatever the lengths of the keys involved.
    """

    def __init__(self, keys: Mapping[str, str]):
        self._entries = [(user, hashlib.sha256(key.encode()).digest()) for user, key in keys.items()]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> KeyStore:
        return cls(load_api_keys(path))

    def __len__(self) -> int:
        return len(self._entries)

    def user_for(self, key: str) -> str | None:
        """The user whose key is ``key``, or ``None``.

        Compares against every stored key, never stopping at the first match,
        so the time taken says nothing about which key (if any) matched.
        """
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for user, stored in self._entries:
            if hmac.compare_digest(stored, digest):
                found = user
        return found


def parse_bearer(authorization: str | None) -> str:
    """The KEY of an ``authorization: Bearer KEY`` value; raises :class:`Unauthenticated` otherwise."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated(
            "this server needs an API key: send 'authorization: Bearer KEY' "
            "(RemoteTextEncoder(target, api_key=...), flux2-dit --api-key or $FLUX2_API_KEY; "
            "HF-compatible clients send $HF_TOKEN, see docs/hf-compatible-endpoint.md)"
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    # RFC 9110: the scheme is case-insensitive.
    if scheme.lower() != "bearer" or not key or " " in key:
        raise Unauthenticated("malformed authorization header: expected 'Bearer KEY'")
    return key


class Authenticator:
    """Turns an ``authorization`` value into a user name.

    Args:
        keys: the known keys; ``None`` disables authentication (everyone is ``anonymous``).
    """

    def __init__(self, keys: KeyStore | None):
        self._keys = keys

    @property
    def required(self) -> bool:
        return self._keys is not None

    @property
    def users(self) -> int:
        """How many users the keys file names (0 without one)."""
        return len(self._keys) if self._keys is not None else 0

    def authenticate(self, authorization: str | None) -> str:
        """The caller's user name; raises :class:`Unauthenticated` for a missing, malformed or unknown key."""
        if self._keys is None:
            return ANONYMOUS
        user = self._keys.user_for(parse_bearer(authorization))
        if user is None:
            raise Unauthenticated("API key not recognised")
        return user


class UserLogFilter(logging.Filter):
    """Adds ``%(user)s`` to every log record: the caller of the current request, ``-`` outside one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.user = current_user.get("-")
        return True
