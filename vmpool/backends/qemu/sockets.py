"""Host-side socket directories of the QEMU backend: directories only we can use.

A socket whose path would not fit in ``sun_path`` goes to a per-user fallback directory under
the temporary directory (``/tmp/vmpool-<uid>/<hash>``); every level of it is checked to be a
real directory of ours with mode 0700, never followed through a symlink.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from vmpool.errors import BackendError

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def private_dir(path: Path, *, repair: bool = False) -> Path:
    """``path`` as a directory only we can use: made with mode 0700 if missing, else checked
    (without following a symlink) to be a directory of our uid with mode 0700.

    With ``repair`` (a directory inside our own state directory, e.g. made by an older
    version), a directory of ours with another mode is set to 0700 instead of refused.
    """
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        kind = "a symlink" if path.is_symlink() else "not a directory"
        raise BackendError(
            f"{path} is {kind} ({exc.strerror}); refusing to put sockets there: remove it"
        ) from exc
    try:
        st = os.fstat(fd)
        if (created or repair) and st.st_uid == os.getuid():
            os.fchmod(fd, 0o700)  # whatever the umask (or an older version) made of it
            st = os.fstat(fd)
        refusal = _refusal(st)
    finally:
        os.close(fd)
    if refusal:
        raise BackendError(f"{path} {refusal}; refusing to put sockets there: remove it")
    return path


def is_private_dir(path: Path) -> bool:
    """Whether ``path`` itself (not a symlink's target) is a directory private_dir() accepts."""
    try:
        return not _refusal(os.lstat(path))
    except OSError:
        return False


def _refusal(st: os.stat_result) -> str:
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to us (uid {os.getuid()})"
    if stat.S_IMODE(st.st_mode) != 0o700:
        return f"has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    return ""


def socket_dir(directory: Path, longest: str) -> Path:
    """Where the sockets of ``directory`` go: itself when ``directory/longest`` fits in
    sun_path, else a per-user fallback directory named by its hash (see make_socket_dir)."""
    if len(os.fsencode(str(directory / longest))) <= MAX_SOCKET_PATH:
        return directory
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return _fallback_base() / digest


def make_socket_dir(directory: Path, longest: str) -> Path:
    """socket_dir(), created: a fallback directory and its parent are made or checked with
    private_dir() (BackendError for a symlink, another owner or a mode other than 0700)."""
    path = socket_dir(directory, longest)
    if path != directory:
        private_dir(path.parent)
        private_dir(path)
    return path


def _fallback_base() -> Path:
    return Path(tempfile.gettempdir()) / f"vmpool-{os.getuid()}"
