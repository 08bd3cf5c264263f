"""Files between the host and a machine: tar archives carried in base64 through exec.

The Backend protocol's exec takes no input and returns text, so an archive travels as base64
text: in chunks appended to a file in the machine (each chunk is one argument, well under the
kernel's 128 KiB limit per argument), and back as one command's output. The machine needs
``sh``, ``tar``, ``base64`` and ``mktemp`` (busybox has them).

Unpacking on the host trusts nothing in the archive: it goes into a fresh private directory
beside the destination with tarfile's ``data`` filter's checks (no absolute names, nothing
outside the destination, no link pointing out of it, no device files) and then is renamed into
place, so a symlink the machine planted is never followed.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from vmpool.errors import TransferError

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
                tar.extractall(staging, members=members, filter=_keep_modes_safely)
        except (tarfile.TarError, OSError) as exc:
            raise TransferError(f"copy_from into {host_path}: {exc}") from exc
        received = staging / arcname
        if not received.exists() and not received.is_symlink():
            raise TransferError(f"copy_from: the archive has no entry {arcname!r}")
        os.replace(received, host_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _keep_modes_safely(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter's refusals, but the entry's permission bits kept."""
    checked = tarfile.data_filter(member, dest)  # raises a FilterError for anything unsafe
    if member.issym():
        return checked
    return checked.replace(mode=member.mode & 0o777, deep=False)

