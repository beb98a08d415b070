"""Reading files that someone else writes: regular files only, never a blocking open.

A model repository is written by people, scripts and federations, carelessly or with hostile
intent. A FIFO under a file's name would block ``open()`` until a writer appears (forever);
a device would stream without end. These helpers open without blocking, check what was
opened (not what the path named a moment before), and refuse anything but a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, NamedTuple


class NotRegularFileError(OSError):
    """A path names a FIFO, a device, a directory or a socket, not a regular file."""


class FileTooLargeError(OSError):
    """A file is larger than its reader accepts."""


class Stamp(NamedTuple):
    """What identifies one state of a file: a rewrite or a replacement changes it."""

    size: int
    mtime_ns: int
    inode: int


def stamp(path: Path) -> Stamp | None:
    """The :class:`Stamp` of the regular file ``path`` names (links followed); None when it
    is missing or not a regular file. Only ``stat``: it never opens the file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return Stamp(st.st_size, st.st_mtime_ns, st.st_ino)


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file.

    Opened with O_NONBLOCK, so a FIFO returns at once instead of waiting for a writer; the
    type is then checked on the descriptor itself (fstat), so the path cannot be swapped
    between check and open. Raises :class:`NotRegularFileError`, or the OSError of the open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The whole content of the regular file ``path``, refused past ``max_bytes`` before
    anything is read (:class:`FileTooLargeError`)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileTooLargeError(f"{path} has {size} bytes, more than {max_bytes} accepted")
        data = f.read(max_bytes + 1)  # it may have grown since the fstat
    if len(data) > max_bytes:
        raise FileTooLargeError(f"{path} has more than {max_bytes} bytes accepted")
    return data


def resolves_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, every link in it followed, lies inside ``root`` (also resolved)."""
    real = Path(os.path.realpath(path))
    return real.is_relative_to(os.path.realpath(root))
