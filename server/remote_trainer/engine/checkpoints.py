"""Checkpoint files: written atomically (temporary file, fsync, rename), read without unpickling code.

A checkpoint name is a relative file name inside the checkpoint folder (sub-folders that exist are
allowed). Names that cannot be a file there are refused as INVALID_ARGUMENT before anything is
written; the temporary file is always in the checkpoint's own folder, with a short name of its own,
so a legal 255-byte name saves too. Disk-full and permission errors are the server's state, not the
request's: RESOURCE_EXHAUSTED and UNAVAILABLE. No message shows a server path.

A ``Quota`` bounds the bytes of one owner's folder (``--max-checkpoint-bytes``). A checkpoint's size
is known only once it is written, so a save checks twice: before writing, with the least the file
can be (the bytes of the tensors it holds: ``torch.save`` stores each one whole), so a save that
certainly does not fit writes nothing; and after writing its temporary file, with the file's real
size, just before the rename, one save of a folder at a time (so two saves cannot both take the last
room). A save refused there removes its temporary file. The file a save replaces, and the files
its caller will remove once it is done, count as freed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import torch

from remote_trainer.engine.errors import FailedPrecondition, NotFound, ResourceExhausted, TrainerError, Unavailable, invalid
from remote_trainer.engine.models import resolve_inside
from remote_trainer.engine.state import SessionState

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
# A temporary file whose writer cannot be told alive or dead (another host's, or an older name) is
# stale only when untouched this long: a live save writes it continuously, and even a large save to
# slow storage rewrites it within minutes.
STALE_TEMPORARY_SECONDS = 3600.0
# ``.<16 hex digits>.<pid>@<writer's host>.tmp``: whose save it is, so a starting server can tell.
_TEMPORARY = re.compile(r"\.[0-9a-f]{16}\.(\d+)@(.+)\.tmp")


def _this_host() -> str:
    """This host, as temporary files name it: the host name and the process-id namespace (two
    containers with one host name have different ones, and a pid means nothing across them)."""
    try:
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = 0
    return f"{socket.gethostname()}~{pid_namespace}"


def owner_folder(checkpoint_dir: str, owner: str = "") -> Path:
    """The folder of ``owner``'s checkpoints: its own one inside the checkpoint directory when tokens
    are in use (``owner`` is the token's name), the directory itself without tokens (owner "")."""
    return Path(checkpoint_dir) / owner if owner else Path(checkpoint_dir)


def checkpoint_path(name: str, checkpoint_dir: str, owner: str = "") -> Path:
    """The file of checkpoint ``name`` in the checkpoint directory (in the owner's own folder when
    tokens are in use, so one token cannot read or overwrite another's checkpoints)."""
    if not checkpoint_dir:
        raise FailedPrecondition("this server has no checkpoint directory: start it with --checkpoint-dir DIR (an existing folder)", "NO_CHECKPOINT_DIR")
    directory = owner_folder(checkpoint_dir, owner)
    with os_errors("the checkpoint folder"):
        directory.mkdir(exist_ok=True)
    path = resolve_inside(name, str(directory), "name")
    if path == directory.resolve():
        raise invalid("name", f"{name!r} names the checkpoint folder itself, not a file in it", "BAD_CHECKPOINT_NAME")
    if path.is_dir():
        raise invalid("name", f"{name!r} is a folder, not a checkpoint file", "BAD_CHECKPOINT_NAME")
    if not path.parent.is_dir():
        raise invalid("name", f"{name!r} is in a folder that does not exist", "BAD_CHECKPOINT_NAME")
    return path


class os_errors:
    """Turns the OS errors of file work into the service's errors, naming ``what`` but no path."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        exc = _os_error(error)
        if exc is None:
            return
        log.warning("%s: %s", self._what, exc)  # the operator's log keeps the path
        text = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ResourceExhausted(f"{self._what}: the server's disk is full ({text})", "DISK_FULL") from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise Unavailable(f"{self._what}: the server may not write there ({text})", "CHECKPOINT_DIR_NOT_WRITABLE") from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise invalid("name", f"{self._what}: the name is too long ({text})", "CHECKPOINT_NAME_TOO_LONG") from exc
        if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENOENT):
            raise invalid("name", f"{self._what}: not a file the server can write ({text})", "BAD_CHECKPOINT_NAME") from exc
        raise Unavailable(f"{self._what}: {text}", "CHECKPOINT_IO_ERROR") from exc


def _os_error(error: BaseException | None) -> OSError | None:
    """The OS error behind ``error``: itself, or the one torch's writer turned into a RuntimeError
    (torch.save reports a failed write as "unexpected pos", the OSError kept as its context)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        if isinstance(error, TrainerError):
            return None
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def temporary_path(path: Path, pid: int = 0) -> Path:
    """A new temporary file for a save to ``path``, named with its writer: ``pid`` (this process by
    default) on this host."""
    return path.parent / f".{secrets.token_hex(8)}.{pid or os.getpid()}@{_this_host()}{TMP_SUFFIX}"


@dataclass(frozen=True)
class Quota:
    """The most bytes one owner's checkpoints may take: every file in ``folder`` (the owner's folder,
    ``owner_folder``) and in its sub-folders, but the temporary files of saves under way. Plain data:
    it crosses to a Ray actor with the save."""

    folder: str
    max_bytes: int
    # Files the caller removes once the save is done (automatic checkpoints past
    # keep_auto_checkpoints): they count as freed, as the file the save replaces does.
    frees: tuple[str, ...] = ()

    def check(self, path: Path, size: int, exact: bool) -> None:
        """Refuses (RESOURCE_EXHAUSTED ``CHECKPOINT_QUOTA``) a save of ``size`` bytes to ``path``
        that would take the folder past ``max_bytes``. ``exact``: ``size`` is the written file's,
        not the least it can be."""
        freed = {path, *(Path(f) for f in self.frees)}
        used = folder_bytes(Path(self.folder))
        kept = used - sum(_size(f) for f in freed)
        if kept + size <= self.max_bytes:
            return
        what = f"{size:,} bytes" if exact else f"at least {size:,} bytes"
        raise ResourceExhausted(
            f"checkpoint quota: saving {path.name!r} ({what}) would take your checkpoints to {kept + size:,} bytes, "
            f"over the quota of {self.max_bytes:,} ({used:,} used now); delete checkpoints you no longer need "
            "(DeleteCheckpoint; ListSessions lists them) and save again",
            "CHECKPOINT_QUOTA",
            metadata={"used_bytes": str(used), "quota_bytes": str(self.max_bytes), "size_bytes": str(size)},
        )


def folder_bytes(folder: Path) -> int:
    """The bytes of the files in ``folder`` and its sub-folders (symbolic links and the temporary
    files of saves under way left out)."""
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                continue
            try:
                stat = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:
                continue  # removed meanwhile
            if S_ISREG(stat.st_mode):
                total += stat.st_size
    return total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() and not path.is_symlink() else 0
    except FileNotFoundError:
        return 0


def least_bytes(value: object, seen: set[int] | None = None) -> int:
    """The least a ``torch.save`` of ``value`` takes: the bytes of the tensors' storages, each once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return int(storage.nbytes())
    if isinstance(value, dict):
        return sum(least_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(least_bytes(v, seen) for v in value)
    return 0


# One quota check and rename at a time: in this process (threads), and between processes on one
# host (flock on the folder). Storage whose locks cannot be taken (some network file systems) keeps
# this process's order only: saves racing on two hosts can then both take the last room.
_ONE_AT_A_TIME = threading.Lock()


@contextlib.contextmanager
def _quota_turn(quota: Quota | None) -> Iterator[None]:
    if quota is None:
        yield
        return
    with _ONE_AT_A_TIME:
        fd = os.open(quota.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                log.debug("no lock on %s (%s): this process's saves still take turns", quota.folder, exc)
            yield
        finally:
            os.close(fd)  # and the lock with it


def save(state: SessionState, path: Path, quota: Quota | None = None) -> int:
    """Writes ``state`` (its ``to_dict()``) to ``path`` atomically: a reader sees the old file or the whole new one.

    The temporary file is ``.<16 hex digits>.<pid>@<host>.tmp`` next to ``path``; one left by a save
    that was killed midway is removed when a server starts (``remove_stale_temporaries``). With a
    ``quota``, a save that would pass it is refused before anything is written when the tensors
    alone pass it, else once the temporary file is written (which is then removed).
    """
    content = state.to_dict()
    if quota is not None:
        quota.check(path, least_bytes(content), exact=False)
    tmp = temporary_path(path)
    with os_errors(f"saving checkpoint {path.name!r}"):
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                torch.save(content, f)
                f.flush()
                os.fsync(f.fileno())
            with _quota_turn(quota):
                if quota is not None:
                    quota.check(path, tmp.stat().st_size, exact=True)
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
        return path.stat().st_size


def load(path: Path) -> SessionState:
    """Reads a checkpoint with ``weights_only=True``: tensors and plain data, never code."""
    if not path.is_file():
        raise NotFound(f"no checkpoint {path.name!r}", "CHECKPOINT_NOT_FOUND")
    try:
        with os_errors(f"reading checkpoint {path.name!r}"):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except TrainerError:
        raise
    except Exception as exc:  # unreadable or not a checkpoint: the caller named a bad file
        detail = str(exc).replace(str(path.parent), "<checkpoints>").splitlines()[0]
        raise invalid("name", f"cannot read checkpoint {path.name!r}: {detail}", "BAD_CHECKPOINT") from exc
    if not isinstance(state, dict):
        raise invalid("name", f"{path.name!r} is not a session checkpoint", "BAD_CHECKPOINT")
    try:
        return SessionState.from_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise invalid("name", f"the checkpoint does not fit this session: {exc}", "BAD_CHECKPOINT") from exc


def delete(path: Path) -> int:
    """Removes the checkpoint file ``path`` (NOT_FOUND ``CHECKPOINT_NOT_FOUND`` when there is none);
    returns the bytes freed."""
    with os_errors(f"deleting checkpoint {path.name!r}"):
        if not path.is_file():
            raise NotFound(f"no checkpoint {path.name!r}", "CHECKPOINT_NOT_FOUND")
        size = path.stat().st_size
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"no checkpoint {path.name!r}", "CHECKPOINT_NOT_FOUND") from None  # deleted meanwhile
        return size


def remove_stale_temporaries(checkpoint_dir: str) -> int:
    """Removes the temporary files of saves that were killed midway (in the folder and its owners'
    folders, one level down); run when a server starts. The folder may be shared by other servers
    and Ray nodes saving right now, so only what is certainly stale goes: a file of a process of
    this host that has ended, or one untouched for ``STALE_TEMPORARY_SECONDS``. Returns the bytes freed."""
    removed = 0
    root = Path(checkpoint_dir)
    here, now = _this_host(), time.time()
    for folder in [root, *(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())]:
        for tmp in folder.glob(f".*{TMP_SUFFIX}"):
            try:
                stat = tmp.lstat()
            except FileNotFoundError:
                continue  # its save just finished
            if not tmp.is_file() or tmp.is_symlink():
                continue
            writer = _TEMPORARY.fullmatch(tmp.name)
            ended = writer is not None and writer.group(2) == here and not _alive(int(writer.group(1)))
            if ended or now - stat.st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink(missing_ok=True)
                removed += stat.st_size
                log.info("removed %s, left by a checkpoint save that did not finish", tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def past_newest(folder: Path, pattern: str, keep: int, newest: Path) -> list[Path]:
    """The files matching ``pattern`` in ``folder`` beyond the ``keep`` newest (by modification
    time) once ``newest`` is written: what ``keep_newest`` then removes (0: none)."""
    if keep <= 0:
        return []
    files = sorted((p for p in folder.glob(pattern) if p.is_file() and p != newest), key=lambda p: p.stat().st_mtime_ns,
                   reverse=True)
    return files[keep - 1:]


def keep_newest(folder: Path, pattern: str, keep: int, newest: Path) -> list[str]:
    """Removes all but the ``keep`` newest files matching ``pattern`` in ``folder``, ``newest``
    (just written) among them; returns the names removed."""
    old = past_newest(folder, pattern, keep, newest)
    for path in old:
        path.unlink(missing_ok=True)
        log.info("removed automatic checkpoint %s (keep_auto_checkpoints=%d)", path.name, keep)
    return [p.name for p in old]


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
