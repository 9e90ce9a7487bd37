"""What README shows a command printing, compared with what the command printed: every line of text,
every field of JSON, so that a shown output that went stale fails a test.

Only what must vary from run to run is normalised, on both sides alike: session ids (32 hex digits),
operation epochs (16), timings, dates. Numbers are compared as numbers: integers exactly; a decimal within one unit of its
last printed digit or 1e-5 of its value (a different reduction order of the same kernels), and 1e-6
absolutely (a mean of rounding noise, such as that of a cross-entropy gradient, which is 0 exactly in
real arithmetic). Text blocks are compared line by line, runs of blanks as one (tables align their
columns to the widest cell).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_VARYING = (
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "<date>"),
    (re.compile(r"\b\d+\.\d+ s\b"), "<seconds> s"),  # "(0.22 s, step_count 1)", "0.71 s/step median"
    (re.compile(r'"seconds": [-+0-9.eE]+'), '"seconds": <seconds>'),
    (re.compile(r"(?<![\w.])[0-9a-f]{32}(?![\w.])"), "<session id>"),
    (re.compile(r"(?<![\w.])[0-9a-f]{16}(?![\w.])"), "<operation epoch>"),  # a session's numbering, new with each server
)


def normalise(text: str) -> str:
    """``text`` with what varies from run to run replaced by a placeholder."""
    for pattern, placeholder in _VARYING:
        text = pattern.sub(placeholder, text)
    return text


def _decimals_unit(token: str) -> float:
    """One unit of the last digit ``token`` prints: 0.01 for "7.35", 1e-16 for "7.82311e-11"."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def same_number(shown: str | float, printed: str | float) -> bool:
    """Whether a printed number is the shown one, within the tolerance above."""
    if isinstance(shown, str) and isinstance(printed, str) and not any(c in shown + printed for c in ".eE"):
        return shown == printed  # integers: exactly
    a, b = float(shown), float(printed)
    unit = max(_decimals_unit(shown), _decimals_unit(printed)) if isinstance(shown, str) and isinstance(printed, str) else 0.0
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=max(unit, 1e-6))


def _parts(line: str) -> list[str]:
    """A line cut into text and numbers, alternately (text first), blanks collapsed."""
    return [" ".join(part.split()) for part in re.split(f"({NUMBER.pattern})", line)]


def assert_same_text(shown: str, printed: str, what: str) -> None:
    """Every line of ``printed`` is the line ``shown`` has there, and there are as many."""
    expected, actual = normalise(shown).strip("\n").splitlines(), normalise(printed).strip("\n").splitlines()
    assert len(expected) == len(actual), f"{what}: README shows {len(expected)} lines, the command printed {len(actual)}:\n{printed}"
    for number, (want, got) in enumerate(zip(expected, actual), 1):
        a, b = _parts(want), _parts(got)
        same = len(a) == len(b) and all(
            (x == y) if i % 2 == 0 else same_number(x, y) for i, (x, y) in enumerate(zip(a, b))
        )
        assert same, f"{what}, line {number}:\n  README shows:  {want}\n  it printed:    {got}"


def json_values(text: str) -> list[Any]:
    """The JSON values in ``text``, one after another (grpcurl prints a message a value)."""
    decoder = json.JSONDecoder()
    values, i, text = [], 0, text.strip()
    while i < len(text):
        value, i = decoder.raw_decode(text, i)
        values.append(value)
        while i < len(text) and text[i].isspace():
            i += 1
    return values


def assert_same_json(shown: Any, printed: Any, where: str) -> None:
    """``printed`` has exactly ``shown``'s fields and values (strings normalised, numbers as above)."""
    if isinstance(shown, dict) and isinstance(printed, dict):
        assert list(shown) == list(printed), f"{where}: README shows the fields {list(shown)}, the command printed {list(printed)}"
        for key in shown:
            assert_same_json(shown[key], printed[key], f"{where}.{key}")
    elif isinstance(shown, list) and isinstance(printed, list):
        assert len(shown) == len(printed), f"{where}: README shows {len(shown)} items, the command printed {len(printed)}"
        for i, (a, b) in enumerate(zip(shown, printed)):
            assert_same_json(a, b, f"{where}[{i}]")
    elif isinstance(shown, str) and isinstance(printed, str):
        assert normalise(shown) == normalise(printed), f"{where}: README shows {shown!r}, the command printed {printed!r}"
    elif isinstance(shown, bool) or isinstance(printed, bool) or shown is None or printed is None:
        assert shown is printed, f"{where}: README shows {shown!r}, the command printed {printed!r}"
    elif isinstance(shown, (int, float)) and isinstance(printed, (int, float)):
        assert same_number(shown, printed), f"{where}: README shows {shown!r}, the command printed {printed!r}"
    else:
        raise AssertionError(f"{where}: README shows {shown!r}, the command printed {printed!r}")


def assert_shown(kind: str, shown: str, printed: str, what: str) -> None:
    """``printed`` is what README's ``kind`` block ("json", or text of any other kind) shows."""
    if kind == "json":
        expected, actual = json_values(shown), json_values(printed)
        assert len(expected) == len(actual), f"{what}: README shows {len(expected)} messages, the command printed {len(actual)}"
        for i, (a, b) in enumerate(zip(expected, actual)):
            assert_same_json(a, b, f"{what}: message {i + 1}")
    else:
        assert_same_text(shown, printed, what)
