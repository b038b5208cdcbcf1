"""Output files that a failed write (a full disk, a quota) or a kill cannot leave half written.

* :func:`append_durably` appends a record (a trajectory frame, a log row) whole or not at all.
* :func:`replace_durably` and :func:`written_atomically` replace a file by a new one through a
  temporary file beside it: a reader sees the old file or the new one, and a failure leaves
  the old one and no temporary file.

Each raises :class:`OutputError`, an ``OSError`` whose ``filename`` is the file the user named
(not a temporary one), so a command can say which of its files could not be written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputError",
    "append_durably",
    "open_appending",
    "replace_durably",
    "written_atomically",
]


class OutputError(OSError):
    """Writing an output file failed: ``filename`` names the file, ``strerror`` says why."""

    @classmethod
    def of(cls, error: OSError, path) -> OutputError:
        """``error`` (an OSError from any write) as an OutputError naming ``path``."""
        if isinstance(error, cls):
            return error
        return cls(error.errno, error.strerror or str(error), str(path))


def open_appending(path: Path, append: bool) -> int:
    """A raw descriptor for appending (``append=False``: the file is emptied first): no buffer
    that could keep half a record for a later flush.

    Raises:
        OutputError: naming ``path``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
    try:
        return os.open(path, flags, 0o666)
    except OSError as error:
        raise OutputError.of(error, path) from error


def append_durably(fd: int, data: bytes, path) -> None:
    """``data`` at the end of ``fd`` and on disk, or none of it: a write that fails part way
    is cut back, so the file ends where it did.

    Raises:
        OutputError: naming ``path``.
    """
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]  # a short write is not an error: go on
        os.fsync(fd)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)  # shrinking needs no space
        raise OutputError.of(error, path) from error


def replace_durably(target: Path, data: bytes) -> None:
    """Replace ``target`` by ``data``.

    Raises:
        OutputError: naming ``target``; the old file stays, and no temporary file.
    """
    with written_atomically(target) as temporary:
        fd = open_appending(temporary, append=False)
        try:
            append_durably(fd, data, target)
        finally:
            os.close(fd)


@contextlib.contextmanager
def written_atomically(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` (same file system) for the block to write; when the
    block ends normally it is flushed to disk and renamed over ``target``, otherwise removed.

    Raises:
        OutputError: an OSError of the block, or of the rename, naming ``target``.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except OSError as error:
        raise OutputError.of(error, target) from error
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
