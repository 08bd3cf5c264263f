"""Files between the host and a machine: tar archives carried in base64 through exec.

The Backend protocol's exec takes no input and returns text, so an archive travels as base64
text: in chunks appended to a file in the machine (each chunk is one argument, well under the
kernel's 128 KiB limit per argument), and back as one command's output. The machine needs
``sh``, ``tar``, ``base64`` and ``mktemp`` (busybox has them).

Unpacking on the host trusts nothing in the archive: it goes into a fresh private directory
beside the destination after checks of vmpool's own, the ones tarfile's ``data`` filter makes
(no absolute names, nothing outside the destination, nothing through a symlink of the archive, no
link pointing out of it, no device files; that filter is missing from Debian 12's Python 3.11.2)
and then is renamed into place, so a symlink the machine planted is never followed.
"""

from __future__ import annotations

import copy
import io
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from vmpool.errors import TransferError

#: tarfile's extraction filters (Python >= 3.11.4; Debian 12 has 3.11.2)
_HAS_FILTERS = hasattr(tarfile, "fully_trusted_filter")
#: base64 characters per exec when sending (one argument of a command)
CHUNK = 64 * 1024

#: sh run in the machine for copy_from: ``$1`` the parent directory, ``$2`` the entry name
PACK_SCRIPT = (
    't=$(mktemp) || exit 1; cd "$1" && tar -c -f "$t" -- "$2" && base64 "$t"; '
    's=$?; rm -f "$t"; exit $s'
)
#: sh run in the machine for copy_to: ``$1`` the received base64, ``$2`` the parent directory
UNPACK_SCRIPT = (
    'base64 -d "$1" > "$1.tar" && mkdir -p "$2" && tar -x -f "$1.tar" -C "$2"; '
    's=$?; rm -f "$1" "$1.tar"; exit $s'
)


def split_machine_path(machine_path: str) -> tuple[str, str]:
    """``(parent, name)`` of a path in the machine; the name must be a real entry."""
    path = PurePosixPath(machine_path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"machine path {machine_path!r} must name a file or directory")
    return str(path.parent), path.name


def pack(host_path: Path, arcname: str) -> bytes:
    """A tar of ``host_path`` (a file or a directory, recursively) named ``arcname`` in it,
    with modes kept and every entry owned by root (host users mean nothing in the machine)."""
    if not host_path.exists() and not host_path.is_symlink():
        raise TransferError(f"copy_to: {host_path} does not exist")

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(str(host_path), arcname=arcname, filter=as_root)
    return buf.getvalue()


def unpack(data: bytes, arcname: str, host_path: Path) -> None:
    """Put the entry ``arcname`` of the tar ``data`` (and what is under it) at ``host_path``.

    An existing file (or symlink) there is replaced; an existing directory is an error. Modes
    are kept except setuid/setgid/sticky bits; owners are not (files belong to this user).
    """
    parent = host_path.parent
    if not parent.is_dir():
        raise TransferError(f"copy_from: {parent} is not a directory")
    try:
        if stat.S_ISDIR(os.lstat(host_path).st_mode):
            raise TransferError(f"copy_from: {host_path} is a directory; name a new path")
    except FileNotFoundError:
        pass
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".vmpool-copy-"))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    top = member.name.lstrip("/").split("/", 1)[0]
                    if top != arcname:
                        raise TransferError(
                            f"copy_from: the archive holds {member.name!r}, not under {arcname!r}"
                        )
                safe = _checked(members)
                if _HAS_FILTERS:  # the checks are done: tarfile's own would drop our modes
                    tar.extractall(staging, members=safe, filter="fully_trusted")
                else:
                    tar.extractall(staging, members=safe)
        except (tarfile.TarError, OSError) as exc:
            raise TransferError(f"copy_from into {host_path}: {exc}") from exc
        received = staging / arcname
        if not received.exists() and not received.is_symlink():
            raise TransferError(f"copy_from: the archive has no entry {arcname!r}")
        os.replace(received, host_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checked(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """``members`` safe to extract into an empty directory, owned by this user, with their
    permission bits but no setuid/setgid/sticky; TransferError naming the first unsafe one."""
    links: set[str] = set()
    out = []
    for member in members:
        name = _inside(member.name, member)
        parts = name.split("/")
        if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
            raise TransferError(f"copy_from: {member.name!r} lies under a symlink of the archive")
        if member.issym():
            _inside(posixpath.join(posixpath.dirname(name), member.linkname), member)
            links.add(name)
        elif member.islnk():
            target = _inside(member.linkname, member)
            target_parts = target.split("/")
            if any("/".join(target_parts[:i]) in links for i in range(1, len(target_parts) + 1)):
                raise TransferError(f"copy_from: hard link {member.name!r} goes through a symlink")
        elif not (member.isreg() or member.isdir()):
            raise TransferError(f"copy_from: {member.name!r} is a device, FIFO or special file")
        safe = copy.copy(member)
        safe.name, safe.mode = name, member.mode & 0o777
        safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""
        out.append(safe)
    return out


def _inside(path: str, member: tarfile.TarInfo) -> str:
    """``path`` normalised, or TransferError when it is absolute or climbs out of the root."""
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm == ".." or norm.startswith("../"):
        raise TransferError(f"copy_from: {member.name!r} points outside the destination ({path!r})")
    return norm

