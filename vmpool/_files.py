"""Files and directories vmpool makes: private to the user (0600/0700) and replaced atomically.

Everything vmpool writes (state records, locks, backend records, the image cache) goes through
these helpers, so that nothing is group- or other-accessible whatever the umask: explicit modes
at creation, never a process-wide umask (the user's tests share the process). Directories and
lock files an older vmpool made with looser modes are tightened when they are next used.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
#: for child processes that create files in vmpool's directories (qemu, qemu-img)
UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Make ``path`` and any missing parents 0700 (existing parents are left as they are);
    an existing ``path`` of ours that is group/other-accessible is made 0700."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.mkdir(d, DIR_MODE)
    if not missing:
        tighten(path)
    return path


def tighten(path: Path) -> None:
    """Drop group/other access from ``path`` if it is ours (never follows a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)


def tighten_tree(root: Path) -> None:
    """tighten() ``root`` and everything below it (for a cache an older vmpool filled)."""
    tighten(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            tighten(Path(folder) / name)


def private_opener(path: str, flags: int) -> int:
    """An ``opener`` for open() (and portalocker.Lock): a new file is 0600, an existing one of
    ours with looser modes (an older vmpool's lock file) is made 0600."""
    fd = os.open(path, flags, FILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.getuid() and stat.S_ISREG(st.st_mode):
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: Path, data: bytes | str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` at once (temp file 0600 beside it, fsync, rename): a
    reader sees the old file or the new one, never a part; the temp file never stays."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
