#!/usr/bin/env python3
"""Generates the error catalogue's two readable forms from the ErrorReason enum of
protos/trainer/v1/errors.proto (its values and their comments, read from the descriptor set with
source info that protoc writes):

- protos/remote_trainer/contract/reasons.py: ``Reason``, an ``enum.StrEnum`` of the wire strings
  (``ERROR_REASON_SESSION_NOT_FOUND`` is sent, and is ``Reason.SESSION_NOT_FOUND``, as
  "SESSION_NOT_FOUND"), each reason's status code, and the look-ups both sides use;
- docs/errors.md: every reason with its status code, its cause and what to do.

Run by scripts/gen-protos.sh (``--check`` included): ``gen-errors.py DESCRIPTOR_SET OUT_ROOT`` writes
the two files under OUT_ROOT. Each value's comment has the parts ``Status:``, ``Cause:``, ``Do:``
and optionally ``Kept:`` (a reason no code raises any more); a comment without them, or a status
that is not a gRPC code name, stops the generation with the value's name.
"""

from __future__ import annotations

import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

PROTO = "trainer/v1/errors.proto"
ENUM = "ErrorReason"
PREFIX = "ERROR_REASON_"
MODULE = Path("protos/remote_trainer/contract/reasons.py")
DOC = Path("docs/errors.md")
# gRPC's status codes, in their order (the doc's sections follow it).
CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
PARTS = ("Status", "Cause", "Do", "Kept")
# Field numbers on the way from a FileDescriptorProto to an enum value (SourceCodeInfo paths).
ENUM_TYPE, ENUM_VALUE = 5, 2


@dataclass(frozen=True)
class Entry:
    """One catalogued reason, as its comment tells it."""

    reason: str
    number: int
    status: str
    cause: str
    do: str
    kept: str


def entries(descriptor_set: Path) -> list[Entry]:
    """The reasons of the ErrorReason enum, in the proto's order, from their comments."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    proto = next(f for f in files if f.name.endswith(PROTO))  # protoc names it remote_trainer/contract/trainer/v1/...
    index = next(i for i, e in enumerate(proto.enum_type) if e.name == ENUM)
    comments = {tuple(loc.path): loc.leading_comments for loc in proto.source_code_info.location}
    found = []
    for i, value in enumerate(proto.enum_type[index].value):
        if value.number == 0:
            continue
        if not value.name.startswith(PREFIX):
            raise SystemExit(f"{PROTO}: {value.name} does not start with {PREFIX}")
        parts = _parts(value.name, comments.get((ENUM_TYPE, index, ENUM_VALUE, i), ""))
        found.append(Entry(value.name.removeprefix(PREFIX), value.number, parts["Status"], parts["Cause"], parts["Do"],
                           parts.get("Kept", "")))
    return found


def _parts(name: str, comment: str) -> dict[str, str]:
    """``{"Status": ..., "Cause": ..., "Do": ...}`` from a value's comment (a part runs on over the
    lines that start with no label)."""
    parts: dict[str, list[str]] = {}
    current = None
    for line in comment.splitlines():
        line = line.strip()
        label = re.match(r"^(\w+): ", line)
        if label and label.group(1) in PARTS:
            current = label.group(1)
            if current in parts:
                raise SystemExit(f"{PROTO}: {name} has two {current}: parts")
            parts[current] = [line[label.end():]]
        elif current is None:
            raise SystemExit(f"{PROTO}: {name}'s comment must start with 'Status: '")
        else:
            parts[current].append(line)
    joined = {k: " ".join(v).strip() for k, v in parts.items()}
    missing = [p for p in ("Status", "Cause", "Do") if not joined.get(p)]
    if missing:
        raise SystemExit(f"{PROTO}: {name}'s comment lacks {', '.join(p + ':' for p in missing)}")
    joined["Status"] = joined["Status"].removesuffix(".")
    if joined["Status"] not in CODES:
        raise SystemExit(f"{PROTO}: {name}'s Status: {joined['Status']!r} is not a gRPC status code name")
    return joined


def module(found: list[Entry]) -> str:
    """protos/remote_trainer/contract/reasons.py."""
    members = []
    for e in found:
        text = f"{e.status}: {_sentence(e.cause)} Do: {_sentence(e.do)}" + (f" Kept: {_sentence(e.kept)}" if e.kept else "")
        doc = textwrap.fill(text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"'), 100, initial_indent="    ",
                            subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
        members.append(f'    {e.reason} = "{e.reason}"\n    """{doc.strip()}"""\n')
    statuses = "".join(f'    Reason.{e.reason}: "{e.status}",\n' for e in found)
    kept = "".join(f"\n    Reason.{e.reason}," for e in found if e.kept)
    kept = f"frozenset({{{kept}\n}})" if kept else "frozenset()"
    return f'''# Generated by scripts/gen-errors.py from the ErrorReason enum of protos/trainer/v1/errors.proto.
# Do not edit: change the proto, then run scripts/gen-protos.sh.
"""The catalogue of refusals: every google.rpc.ErrorInfo reason the trainer.v1 service and its SDK give.

``Reason`` is a ``str``: ``Reason.SESSION_NOT_FOUND == "SESSION_NOT_FOUND"``, the string the wire
carries (the proto's value ERROR_REASON_SESSION_NOT_FOUND without its prefix). ``STATUS`` gives each
reason's gRPC status code name; docs/errors.md tells each one's cause and what to do. The server
raises catalogued reasons only (``require``); the SDK reads a reason with ``known``, which keeps a
reason it does not know (a newer server's) as the plain string.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """An ErrorInfo reason: its status code, its cause and what to do (docs/errors.md)."""

{"".join(members).rstrip()}


# Each reason's gRPC status code name (``grpc.StatusCode[STATUS[reason]]``).
STATUS: dict[Reason, str] = {{
{statuses}}}

# Reasons no code raises any more, kept for old clients and the answers old checkpoints recorded.
KEPT: frozenset[Reason] = {kept}

_BY_VALUE: dict[str, Reason] = {{r.value: r for r in Reason}}


def known(reason: str) -> Reason | str:
    """``reason`` as a ``Reason`` when the catalogue has it; else the string itself (a reason of a
    newer server, or the empty reason of an error without ErrorInfo)."""
    return _BY_VALUE.get(reason, reason)


def require(reason: str) -> Reason:
    """``reason`` as a ``Reason``; ValueError when the catalogue does not have it."""
    try:
        return _BY_VALUE[reason]
    except KeyError:
        raise ValueError(
            f"reason {{reason!r}} is not in the catalogue: add ERROR_REASON_{{reason}} to the ErrorReason enum of "
            "protos/trainer/v1/errors.proto (its status code, cause and what to do), then run scripts/gen-protos.sh"
        ) from None
'''


def doc(found: list[Entry]) -> str:
    """docs/errors.md."""
    by_status = {code: sorted((e for e in found if e.status == code), key=lambda e: e.reason) for code in CODES}
    index = "".join(
        f"| [`{code}`](#{code.lower()}) | {', '.join(f'`{e.reason}`' for e in group)} |\n"
        for code, group in by_status.items() if group
    )
    sections = []
    for code, group in by_status.items():
        if not group:
            continue
        rows = "".join(
            f"| `{e.reason}` | {_cell(e.cause)}{' *Kept:* ' + _cell(e.kept) if e.kept else ''} | {_cell(e.do)} |\n"
            for e in group
        )
        sections.append(f"## {code}\n\n| reason | cause | what to do |\n|---|---|---|\n{rows}")
    return f"""# Errors: every reason, its status code, its cause and what to do

<!-- Generated by scripts/gen-errors.py from the ErrorReason enum of protos/trainer/v1/errors.proto.
Do not edit: change the proto's comments, then run scripts/gen-protos.sh. -->

Every error the service answers carries a `google.rpc.ErrorInfo` (domain `trainer.v1`) in its
status details, and a field error also a `google.rpc.BadRequest` naming the field. Its `reason`
says what happened, in one word to branch on; this page lists all {len(found)} of them, by status
code. Some come with `ErrorInfo.metadata` (a limit, the number a session expects), named in the
cause. An error gRPC itself makes (a message over the size limit, a connection that cannot be made)
has no ErrorInfo, so no reason.

Where to read it:
- the SDK: `error.reason` of the `TrainerError` it raises, a `Reason`
  (`from remote_trainer.contract.reasons import Reason`): `error.reason == "SESSION_NOT_FOUND"` and
  `error.reason is Reason.SESSION_NOT_FOUND` both hold; a reason this SDK does not know (from a newer
  server) stays a plain string;
- `trainer-client`: the error line ends with the reason in brackets, `NOT_FOUND: ... [SESSION_NOT_FOUND]`;
- grpcurl: `Details:` prints the ErrorInfo, `"reason":"SESSION_NOT_FOUND"`; and
  `grpcurl -plaintext localhost:50051 describe trainer.v1.ErrorReason` prints this catalogue from the
  server.

The catalogue is the `ErrorReason` enum of `protos/trainer/v1/errors.proto` (value
`ERROR_REASON_SESSION_NOT_FOUND` is sent as reason `SESSION_NOT_FOUND`); this page is generated from its
comments. A refused call changes nothing in the session. A few reasons are the SDK's own (raised
before or instead of a call) or meet only the operator (at server start, in the server's log); their
cause says so.

| status code | reasons |
|---|---|
{index}
""" + "\n".join(sections)


def _sentence(text: str) -> str:
    """``text`` starting with a capital letter (the proto's comments read "Cause: the ...")."""
    return text[:1].upper() + text[1:]


def _cell(text: str) -> str:
    """``text`` as a sentence in a Markdown table cell."""
    return _sentence(text).replace("|", "\\|")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gen-errors.py DESCRIPTOR_SET OUT_ROOT", file=sys.stderr)
        return 2
    found = entries(Path(argv[0]))
    root = Path(argv[1])
    for path, text in ((MODULE, module(found)), (DOC, doc(found))):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
