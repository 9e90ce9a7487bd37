"""Choosing parameters by name: globs and module prefixes."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from remote_trainer.engine.errors import NotFound, invalid


def match_patterns(names: list[str], patterns: Iterable[str], field_name: str = "patterns") -> list[str]:
    """Names matching any pattern, in ``names`` order.

    A pattern is a glob on the full name ("layer4.*", "*") or a module prefix ("layer1" matches
    "layer1.0.conv1.weight"). A pattern that matches nothing is refused, naming it.
    """
    chosen: set[str] = set()
    for pattern in patterns:
        if not pattern:
            raise invalid(field_name, "an empty pattern matches nothing", "PATTERN_MATCHES_NOTHING")
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".") or n == pattern}
        if not hits and not any(ch in pattern for ch in "*?["):
            raise NotFound(f"no parameter or module named {pattern!r}", "PARAMETER_NOT_FOUND")
        if not hits:
            raise invalid(field_name, f"pattern {pattern!r} matches no parameter", "PATTERN_MATCHES_NOTHING")
        chosen |= hits
    return [n for n in names if n in chosen]
