"""Who may open the review station, and which server files its page may open.

The app shows patient images and has no login, so a server reachable from other machines needs a
shared secret. The token arrives once in the address (``?token=...``, the link printed at start);
the server then keeps it in an HttpOnly, same-site cookie (so it leaves the address bar and later
requests, the websocket included, carry it) and checks it on every request.

A path typed in the page opens only files in the data folders the operator named at start
(``--data-root``), so the page is no window on the rest of the server's files.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from SCNLandmarksLib.errors import DataError

TOKEN_ENVIRONMENT = "SCN_LANDMARKS_TOKEN"
GENERATE = "auto"  # `--token auto`: a fresh random token, printed once inside the start URL
COOKIE = "scn_landmarks_access"
QUERY = "token"


class AccessError(ValueError):
    """The server cannot start with these settings (says what to change)."""


def isLoopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def resolveToken(host: str, token: str | None) -> str | None:
    """The access token the server will require (None: none required, loopback only).

    Args:
        host: the address the server listens on.
        token: `--token` (a secret, or "auto" to generate one); else the environment variable
            SCN_LANDMARKS_TOKEN is used.

    Raises:
        AccessError: a non-loopback host without a token, or a token too short to be a secret.
    """
    token = token or os.environ.get(TOKEN_ENVIRONMENT) or None
    if token == GENERATE:
        return secrets.token_urlsafe(24)
    if token is None:
        if isLoopback(host):
            return None
        raise AccessError(
            f"--host {host} makes the review station reachable from other machines, and it shows patient "
            f"images: give an access token with --token SECRET (or the environment variable {TOKEN_ENVIRONMENT}), "
            f"or --token {GENERATE} to generate one and print the link to open."
        )
    if len(token) < 16:
        raise AccessError("The access token must be at least 16 characters long (use --token auto for a random one).")
    return token


def cookieValue(token: str) -> str:
    """What the browser keeps instead of the token itself."""
    return hashlib.sha256(f"scn-landmarks access {token}".encode()).hexdigest()


def matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison (the time taken does not tell how much of a guess was right)."""
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def dataFile(typed: str, roots: Sequence[Path]) -> Path:
    """The file a path typed in the page names, when it lies in one of the data folders.

    Symlinks and ``..`` are resolved before the check, and a path outside every data folder gets the
    same answer as one that does not exist: the page cannot learn which of the server's files exist.

    Args:
        typed: the path as typed (absolute, or relative to a data folder).
        roots: the data folders (`--data-root`), resolved.

    Raises:
        DataError: no data folders, or no such file in them.
    """
    if not roots:
        raise DataError("This station opens no files on the server (it was started without --data-root).")
    typed = typed.strip()
    candidates = [Path(typed)] if Path(typed).is_absolute() else [root / typed for root in roots]
    for candidate in candidates:
        path = candidate.resolve()
        if typed and any(path.is_relative_to(root) for root in roots) and path.is_file():
            return path
    folders = ", ".join(str(root) for root in roots)
    raise DataError(f"{typed}: no such file in the station's data folders ({folders})")
