"""Bearer tokens as the operator gives them: ``--tokens`` and ``--tokens-file`` entries, each ``token`` or
``name:token``, parsed into digest -> caller name.

Plain text work only (no grpc, no torch), so the settings check them before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path


def digest(token: str) -> bytes:
    """What a token is known by: its SHA-256 digest (compared without leaking the token by timing)."""
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(lines: Sequence[str]) -> dict[bytes, str]:
    """Token digest -> caller name, from ``token`` or ``name:token`` entries."""
    tokens: dict[bytes, str] = {}
    for raw in lines:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, _, token = entry.rpartition(":")
        name, token = name.strip(), token.strip()
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"token name {name!r} may hold only letters, digits and _ . -")
        if not token:  # "alice:" (an unset variable) would make the empty bearer token valid
            raise ValueError(f"the token of {name or 'an entry'!r} is empty")
        # A token without a name is known by a digest of it (never the token itself: names are logged).
        tokens[digest(token)] = name or "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
    return tokens


def load_tokens(tokens: str, tokens_file: str) -> dict[bytes, str] | None:
    """The tokens of ``--tokens`` (comma-separated) and ``--tokens-file`` (one a line), or None when
    authentication is off (neither set). Fails closed: flags that ask for tokens but yield none, or
    an empty one, raise ``ValueError``, so a server never starts open by mistake."""
    if not tokens and not tokens_file:
        return None
    lines = tokens.split(",")
    if tokens_file:
        lines += Path(tokens_file).read_text().splitlines()
    parsed = parse_tokens(lines)
    if not parsed:
        where = " and ".join(what for what, value in (("tokens", tokens), ("tokens-file", tokens_file)) if value)
        raise ValueError(f"{where} set but no token given: refusing to start without authentication")
    return parsed
