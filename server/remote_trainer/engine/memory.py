"""Giving freed memory back to the operating system (glibc arenas, the CUDA caching allocator)."""

from __future__ import annotations

import gc

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

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def reuse_freed_buffers(max_bytes: int) -> bool:
    """Lets glibc reuse freed buffers of up to ``max_bytes`` instead of unmapping them.

    By default glibc maps each large allocation (a 1 MiB message, a gradient array) fresh and
    unmaps it on free, so every message page-faults its memory in again: 47 MB of 1 MiB buffers
    took 35 ms to fill here against 8 ms with reuse. A larger trim threshold keeps freed heap for
    the next call; ``release_freed_memory`` still hands it back when a session closes. Returns
    whether glibc took the settings (False elsewhere).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt: Callable[[int, int], int] = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, max_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 8 * max_bytes))


def release_freed_memory() -> None:
    """Hands memory that closed sessions freed back to the operating system.

    glibc keeps freed heap pages (in every thread's arena) for reuse, so without this a closed
    session's 140 MB of weights, gradients and optimizer state stay in the server's RSS; the CUDA
    caching allocator likewise keeps freed blocks reserved. First the garbage collector runs: a
    refused call's traceback holds the frames of the session's methods in a reference cycle, which
    would keep the closed session (its memory, and its share of the memory budget) until the
    collector happened to run (a create right after a close was then refused SERVER_MEMORY_BUDGET).
    Costs about 80 ms, once per close (three resnet18s alive, the 2-core machine under load).
    """
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    release_cached_device_memory()


def release_cached_device_memory() -> None:
    """Gives the blocks the CUDA caching allocator keeps for reuse back to the device (when CUDA is in use)."""
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()
