"""``Operation``: the number a client gives a call that changes its session (engine/ledger.py).

Plain data with no dependencies, so the server's call machinery reads it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Operation:
    """A numbered call: its place in the session's order, the RPC it is and what it asks (a repeat must
    be the same call), and whether the client gave up the numbers below it that have not arrived."""

    number: int
    method: str
    supersede: bool = False
    client: str = ""  # who numbers the calls: a repeat from another client is not answered
    epoch: str = ""  # the numbering the client follows (Ledger.epoch); empty: not checked
    request: str = ""  # a digest of what the call asks (server/rpc.py request_digest); empty: not checked
