"""Checkpoint files: written atomically (temporary file, fsync, rename), read without unpickling code."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from remote_trainer.engine.errors import FailedPrecondition, NotFound, invalid
from remote_trainer.engine.models import resolve_inside


def checkpoint_path(name: str, checkpoint_dir: str, owner: str = "") -> Path:
    """The file of checkpoint ``name`` in the checkpoint directory (in the owner's own folder when
    tokens are in use, so one token cannot read or overwrite another's checkpoints)."""
    if not checkpoint_dir:
        raise FailedPrecondition("this server has no checkpoint directory (--checkpoint-dir)", "NO_CHECKPOINT_DIR")
    directory = Path(checkpoint_dir) / owner if owner else Path(checkpoint_dir)
    directory.mkdir(exist_ok=True)
    return resolve_inside(name, str(directory), "name")


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint on disk: its name, size and when it was written (Unix seconds)."""

    name: str
    size_bytes: int
    modified: float


def list_checkpoints(checkpoint_dir: str, owner: str = "") -> list[CheckpointFile]:
    """The checkpoints ``owner`` may load, by name; none when there is no checkpoint directory.

    Files directly in the owner's folder (the directory itself without tokens), leaving out the
    temporary files of saves in progress."""
    if not checkpoint_dir:
        return []
    directory = Path(checkpoint_dir) / owner if owner else Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        found.append(CheckpointFile(path.name, stat.st_size, stat.st_mtime))
    return found


def save(state: dict[str, object], path: Path) -> int:
    """Writes ``state`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    return path.stat().st_size


def load(path: Path) -> dict[str, object]:
    """Reads a checkpoint with ``weights_only=True``: tensors and plain data, never code."""
    if not path.is_file():
        raise NotFound(f"no checkpoint {path.name!r}", "CHECKPOINT_NOT_FOUND")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or not a checkpoint: the caller named a bad file
        raise invalid("name", f"cannot read checkpoint {path.name!r}: {exc}", "BAD_CHECKPOINT") from exc
    if not isinstance(state, dict):
        raise invalid("name", f"{path.name!r} is not a session checkpoint", "BAD_CHECKPOINT")
    return state
