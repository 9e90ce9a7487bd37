"""The sizes a session accepts, in one place (the server's settings take their defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

# Largest classifier head (CreateSession and ReplaceHead). 100,000 covers the largest common label
# sets (ImageNet-21k has 21,841 classes) five times over; nn.Linear(512, 100_000) is 205 MB of weights,
# about 820 MB with its gradient and two optimizer slots, and its logits are 400 KB per image.
MAX_CLASSES = 100_000

# Name patterns (GetGradients, GetParameters, FreezeLayers): resnet18 has 62 parameters and 122
# state tensors, so a few hundred patterns name anything; each is a glob or a dotted prefix.
MAX_PATTERNS = 1000
MAX_PATTERN_LENGTH = 256


@dataclass(frozen=True)
class Limits:
    """Input limits a session enforces."""

    max_input_elements: int = 4 * 32 * 3 * 224 * 224
    max_batch: int = 256
