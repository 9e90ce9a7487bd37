"""The sizes a session accepts, in one place (the server's settings take their defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

# Largest classifier head (CreateSession and ReplaceHead): nn.Linear(512, N) is 2 GiB at a million.
MAX_CLASSES = 1_000_000


@dataclass(frozen=True)
class Limits:
    """Input limits a session enforces."""

    max_input_elements: int = 4 * 32 * 3 * 224 * 224
    max_batch: int = 256
