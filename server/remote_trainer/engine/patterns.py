"""Choosing parameters by name: globs and module prefixes, bounded in number and length."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from remote_trainer.engine.errors import NotFound, invalid
from remote_trainer.engine.limits import MAX_PATTERN_LENGTH, MAX_PATTERNS


def match_patterns(names: list[str], patterns: Iterable[str], field_name: str = "patterns") -> list[str]:
    """Names matching any pattern, in ``names`` order.

    A pattern is a glob on the full name ("layer4.*", "*") or a module prefix ("layer1" matches
    "layer1.0.conv1.weight"). A pattern that matches nothing is refused, naming it. At most
    ``MAX_PATTERNS`` patterns of at most ``MAX_PATTERN_LENGTH`` characters each are taken (checked
    before any matching), and repeated patterns are matched once, so the work is bounded by
    ``MAX_PATTERNS`` x the number of names.
    """
    given = list(patterns)
    if len(given) > MAX_PATTERNS:
        raise invalid(field_name, f"{len(given)} patterns given; at most {MAX_PATTERNS} are taken", "TOO_MANY_PATTERNS")
    for pattern in given:
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise invalid(
                field_name, f"a pattern of {len(pattern)} characters is over the limit of {MAX_PATTERN_LENGTH}", "PATTERN_TOO_LONG"
            )
    chosen: set[str] = set()
    for pattern in dict.fromkeys(given):  # each distinct pattern once, in the order given
        if not pattern:
            raise invalid(field_name, "an empty pattern matches nothing", "PATTERN_MATCHES_NOTHING")
        glob = re.compile(fnmatch.translate(pattern)).match
        hits = {n for n in names if glob(n) or n.startswith(pattern + ".") or n == pattern}
        if not hits and not any(ch in pattern for ch in "*?["):
            raise NotFound(f"no parameter or module named {pattern!r}", "PARAMETER_NOT_FOUND")
        if not hits:
            raise invalid(field_name, f"pattern {pattern!r} matches no parameter", "PATTERN_MATCHES_NOTHING")
        chosen |= hits
    return [n for n in names if n in chosen]
