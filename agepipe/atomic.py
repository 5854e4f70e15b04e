"""Atomic writes: a file appears whole under its name or not at all.

The data goes to a temporary name in the same folder (a rename never crosses file systems), is
flushed to disk, then renamed over the final name; an error removes the temporary, so a crash or
a failed write leaves the old file, or none, and a rerun trusts only what it finds whole.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temporary_name(name: str) -> str:
    """A hidden name beside ``name``, unique per call, so concurrent writers never share one."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error, removed otherwise. Unique per call, so concurrent writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `--out new/dir/x` needs no mkdir first
    tmp = path.with_name(temporary_name(path.name))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)    # the bytes reach the disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_atomic(fs, path: str, mode: str):
    """atomic_path for a path on any fsspec filesystem (local, S3, ...), as an open file: the
    temporary is flushed and, where the file has a descriptor, fsync'd before the rename; removed
    if the block fails."""
    folder, name = path.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/{temporary_name(name)}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
            f.flush()
            with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
                os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        _rename(fs, tmp, path)  # inside: a rename that fails (a copy cut off) leaves no temporary either
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)  # not fs.rm: it reads [, * or ? as a pattern
        raise


def _rename(fs, tmp: str, path: str) -> None:
    """fs.mv, but on a local disk os.replace (an atomic rename), and where the file system has no
    move of its own (an object store: a copy and a delete anyway) cp_file and rm_file: fsspec's
    generic mv reads a [, * or ? in the path as a pattern, so nothing could be written to a store
    at 's3://bucket/store [1]' (nor on a local disk with fsspec 2023.1.0)."""
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.spec import AbstractFileSystem

    if isinstance(fs, LocalFileSystem):
        os.replace(fs._strip_protocol(tmp), fs._strip_protocol(path))
    elif type(fs).mv is AbstractFileSystem.mv:
        fs.cp_file(tmp, path)
        fs.rm_file(tmp)
    else:
        fs.mv(tmp, path)


# A file system that does not lock (NFS without its lock daemon: ENOLCK; some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def flock(f, wait: bool) -> bool:
    """An exclusive flock on the open file ``f``: True once held; False where ``wait`` is off and
    another process holds it. Released as ``f`` closes, or by the kernel if the process dies.
    Where the file system locks nothing, True with a warning: refusing every command there
    would stop more work than the lock protects."""
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        logging.getLogger(__name__).warning(
            "%s: the file system does not lock files (%s): nothing stops two agepipe commands from "
            "writing here at once; run one at a time", f.name, os.strerror(e.errno))
    return True


class FolderError(ValueError):
    """An output folder a command cannot write: another command is writing it, or the system refuses it."""


@contextlib.contextmanager
def only_writer(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """One agepipe command at a time writing ``folder`` (train's or table's --out, a demo's folder):
    two at once wrote each other's run files, one removed the other's runs as an earlier
    cross-validation's, and one ended in a FileNotFoundError traceback. An flock on FOLDER/.lock,
    released by the kernel if the process dies; a second command stops at once, before any work."""
    folder = Path(folder)
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a")
    except OSError as e:  # a file where the folder should be, no permission: said before any work
        raise FolderError(f"{cannot_write(folder, e)}; give `agepipe {command}` another folder") from None
    with f:
        if not flock(f, wait=False):
            raise FolderError(f"{folder}: another agepipe command is writing this folder now; let it finish, "
                              f"or give `agepipe {command}` another one")
        try:
            yield
        finally:
            if made and os.listdir(folder) == [".lock"]:  # a command that failed before writing leaves no folder
                with contextlib.suppress(OSError):
                    os.unlink(folder / ".lock")
                    folder.rmdir()


def cannot_write(path: str | os.PathLike, error: OSError) -> str:
    """``PATH: cannot write (why)`` for an output a user named that the system refused: no such
    folder, no permission, a full disk, a file where its folder should be."""
    if isinstance(error, FileExistsError):  # mkdir of the folder met a file of that name
        why = f"{error.filename} is a file, not a folder"
    else:
        why = os.strerror(error.errno) if error.errno else str(error)
    return f"{path}: cannot write ({why})"


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
