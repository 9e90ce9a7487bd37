"""Giving freed memory back to the operating system (glibc arenas, the CUDA caching allocator)."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hands memory that closed sessions freed back to the operating system.

    glibc keeps freed heap pages (in every thread's arena) for reuse, so without this a closed
    session's 140 MB of weights, gradients and optimizer state stay in the server's RSS; the CUDA
    caching allocator likewise keeps freed blocks reserved. Costs about a millisecond.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()
