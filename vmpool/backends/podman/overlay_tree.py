"""The file work of a live reset (vmpool.backends.podman.live_reset), on an overlay container.

It scans directories into manifests (`scan`), resolves what the container's ready-time merged
view held at a path as overlayfs does (`Layers`: the ready upper directory's copy over the
image's lower directories), and writes through the container's own root (`Merged`) one path
component at a time: no symlink is ever followed (``/proc/PID/root`` would resolve an absolute
one against the host's root) and no mount is crossed. Anything unexpected raises `Unsupported`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OVERLAY_XATTR = "trusted.overlay."
#: files podman bind-mounts into the container; their content is per-container state
BIND_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf", "run/.containerenv")


class Unsupported(Exception):
    """Internal: a live reset cannot be (or could not be) done safely; fall back."""


class Entry(NamedTuple):
    """One file system entry as lstat shows it; ``kind`` "w" is an overlay whiteout."""

    kind: str
    ino: int
    ctime: int
    mtime: int
    mode: int
    uid: int
    gid: int
    size: int
    rdev: int = 0
    target: str = ""
    opaque: bool = False

    @classmethod
    def of(cls, st: os.stat_result, target: str = "", opaque: bool = False) -> Entry:
        fmt = stat.S_IFMT(st.st_mode)
        kind = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
                stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}[fmt]
        if kind == "c" and st.st_rdev == 0:
            kind = "w"
        return cls(kind, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                   st.st_uid, st.st_gid, st.st_size, st.st_rdev, target, opaque)


Manifest = dict[str, Entry]


def join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")
    yield "."
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def open_dir(rel: str, root: int, *, dev: int | None) -> int:
    """A directory fd for ``rel`` under ``root``, one component at a time, never following a
    symlink; with ``dev``, never leaving that file system (a mount)."""
    fd = os.dup(root)
    try:
        for part in ([] if rel == "." else rel.split("/")):
            if part in ("", ".", ".."):
                raise Unsupported(f"bad path {rel!r}")
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if dev is not None and os.fstat(fd).st_dev != dev:
                raise Unsupported(f"/{rel} crosses a mount")
    except BaseException:
        os.close(fd)
        raise
    return fd


def parent_and_name(rel: str) -> tuple[str, str]:
    head, _, tail = rel.rpartition("/")
    return head or ".", tail


def scan(root: int, *, dev: int | None = None, skip: frozenset[str] = frozenset()) -> Manifest:
    """Every entry under the directory fd ``root`` (``"."`` itself included), not following
    symlinks; directories on another file system (mounts) are listed but not entered."""
    found: Manifest = {}

    def walk(fd: int, rel: str) -> None:
        for entry in os.scandir(fd):
            path = join(rel, entry.name)
            st = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(entry.name, _DIR, dir_fd=fd)
                try:
                    found[path] = Entry.of(st, opaque=_opaque(sub))
                    if path not in skip and (dev is None or st.st_dev == dev):
                        walk(sub, path)
                finally:
                    os.close(sub)
            else:
                found[path] = Entry.of(st, target)

    found["."] = Entry.of(os.fstat(root), opaque=_opaque(root))
    walk(root, ".")
    return found


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


def _xattrs(fd: int) -> dict[str, bytes]:
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    return {n: os.getxattr(fd, n) for n in names if not n.startswith(_OVERLAY_XATTR)}


class Layers:
    """The ready-time merged view, resolved as overlayfs does: the ready upper (manifest and
    file copies) over the image's lower directories (read from the host, read-only)."""

    def __init__(self, ready: Manifest, blobs: Path, lowers: list[int]) -> None:
        self.ready, self.blobs, self.lowers = ready, blobs, lowers
        self._children: dict[str, list[str]] = {}
        for rel in ready:
            if rel != ".":
                parent, name = parent_and_name(rel)
                self._children.setdefault(parent, []).append(name)

    def _lookup(self, layer: int, rel: str) -> Entry | None:
        if layer < 0:
            return self.ready.get(rel)
        parent, name = parent_and_name(rel)
        try:
            fd = open_dir(parent, self.lowers[layer], dev=None) if rel != "." else None
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None
        if fd is None:
            return Entry.of(os.fstat(self.lowers[layer]))
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
            opaque = False
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR, dir_fd=fd)
                opaque = _opaque(sub)
                os.close(sub)
            return Entry.of(st, target, opaque)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    def _layers(self, rel: str) -> Iterator[tuple[int, Entry | None, bool]]:
        """(layer, its entry for rel, whether lower layers are hidden below it) top down."""
        for layer in range(-1, len(self.lowers)):
            hidden = False
            present = True
            for parent in (_parents(rel) if rel != "." else ()):
                e = self._lookup(layer, parent)
                if e is None:
                    present = False
                    break
                if e.kind != "d":  # a whiteout or a file hides everything under it
                    return
                hidden = hidden or e.opaque
            entry = self._lookup(layer, rel) if present else None
            if entry is not None and entry.kind == "w":
                return
            stop = hidden or (entry is not None and (entry.opaque or entry.kind != "d"))
            yield layer, entry, stop
            if stop:
                return

    def resolve(self, rel: str) -> tuple[int, Entry] | None:
        for layer, entry, _hidden in self._layers(rel):
            if entry is not None:
                return layer, entry
        return None

    def children(self, rel: str) -> list[str]:
        names: set[str] = set()
        for layer, entry, hidden in self._layers(rel):
            if entry is not None and entry.kind == "d":
                if layer < 0:
                    names.update(self._children.get(rel, []))
                else:
                    fd = open_dir(rel, self.lowers[layer], dev=None)
                    try:
                        names.update(os.listdir(fd))
                    finally:
                        os.close(fd)
            if hidden:
                break
        return sorted(n for n in names if self.resolve(join(rel, n)) is not None)

    def open_file(self, layer: int, rel: str) -> int:
        if layer < 0:
            return os.open(self.blobs / _blob(rel), _FILE)
        parent, name = parent_and_name(rel)
        fd = open_dir(parent, self.lowers[layer], dev=None)
        try:
            return os.open(name, _FILE, dir_fd=fd)
        finally:
            os.close(fd)

    def xattrs(self, layer: int, rel: str, xattrs: dict[str, dict[str, str]]) -> dict[str, bytes]:
        if layer < 0:
            return {k: base64.b64decode(v) for k, v in xattrs.get(rel, {}).items()}
        entry = self._lookup(layer, rel)
        if entry is None or entry.kind not in "df":
            return {}
        parent, name = parent_and_name(rel)
        fd = open_dir(parent, self.lowers[layer], dev=None)
        try:
            flags = _DIR if entry.kind == "d" else _FILE
            sub = os.open(name, flags, dir_fd=fd)
            try:
                return _xattrs(sub)
            finally:
                os.close(sub)
        finally:
            os.close(fd)


def _copy(src: int, dst: int) -> None:
    """Copy the rest of ``src`` to ``dst``, and close ``dst``."""
    try:
        while chunk := os.read(src, 1 << 20):
            os.write(dst, chunk)
    finally:
        os.close(dst)


def _blob(rel: str) -> str:
    return base64.urlsafe_b64encode(rel.encode()).decode()


class Merged:
    """Writes to the container's merged view through its root fd: no symlink followed, no
    mount crossed (the root's file system only)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.dev = os.fstat(root).st_dev

    @contextlib.contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        parent, name = parent_and_name(rel)
        fd = open_dir(parent, self.root, dev=self.dev)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            with self.parent(rel) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a parent is now a symlink: rel does not exist
                return None
            raise

    def remove(self, rel: str) -> None:
        with self.parent(rel) as (fd, name):
            remove_at(fd, name, self.dev)

    def create(self, rel: str, layer: int, entry: Entry, layers: Layers,
               xattrs: dict[str, bytes]) -> None:
        with self.parent(rel) as (fd, name):
            if entry.kind == "d":
                os.mkdir(name, 0o700, dir_fd=fd)
            elif entry.kind == "f":
                src = layers.open_file(layer, rel)
                try:
                    _copy(src, os.open(name, _NEW, 0o600, dir_fd=fd))
                finally:
                    os.close(src)
            elif entry.kind == "l":
                os.symlink(entry.target, name, dir_fd=fd)
            elif entry.kind in "cbp":
                kind = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[entry.kind]
                os.mknod(name, kind | 0o600, entry.rdev, dir_fd=fd)
            else:
                raise Unsupported(f"cannot recreate /{rel} (a {entry.kind!r})")
        self.set_meta(rel, entry, xattrs)

    def set_meta(self, rel: str, entry: Entry, xattrs: dict[str, bytes] | None) -> None:
        """Owner, mode, extended attributes and times of ``rel`` as in ``entry``."""
        with self.parent(rel) as (fd, name):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if Entry.of(st).kind != entry.kind:
                raise Unsupported(f"/{rel} changed kind while being restored")
            if entry.kind == "l":
                os.chown(name, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
            elif entry.kind in "df":
                flags = _DIR if entry.kind == "d" else _FILE
                sub = os.open(name, flags | os.O_NONBLOCK, dir_fd=fd)
                try:
                    os.fchown(sub, entry.uid, entry.gid)
                    os.fchmod(sub, entry.mode)
                    if xattrs is not None:
                        for key in set(_xattrs(sub)) - set(xattrs):
                            os.removexattr(sub, key)
                        for key, value in xattrs.items():
                            os.setxattr(sub, key, value)
                finally:
                    os.close(sub)
            else:  # a device or fifo we just made, or checked: not a symlink, the container frozen
                os.chown(name, entry.uid, entry.gid, dir_fd=fd)
                os.chmod(name, entry.mode, dir_fd=fd)
            os.utime(name, ns=(entry.mtime, entry.mtime), dir_fd=fd, follow_symlinks=False)


def remove_at(fd: int, name: str, dev: int) -> None:
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    if st.st_dev != dev:
        raise Unsupported(f"{name} is a mount point")
    sub = os.open(name, _DIR, dir_fd=fd)
    try:
        for child in os.listdir(sub):
            remove_at(sub, child, dev)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=fd)



def same_but_times(a: Entry | None, b: Entry) -> bool:
    """Entries equal but for times: a directory whose children changed and came back, a
    terminal written to."""
    return a is not None and (a.kind, a.ino, a.mode, a.uid, a.gid, a.rdev, a.target) == (
        b.kind, b.ino, b.mode, b.uid, b.gid, b.rdev, b.target)


def copy_upper(up: int, ready: Manifest, blobs: Path) -> dict[str, dict[str, str]]:
    """Copy the upper directory's regular files to ``blobs`` (0600); return the entries'
    extended attributes (base64), the overlay's own excepted."""
    xattrs: dict[str, dict[str, str]] = {}
    for rel, entry in ready.items():
        if entry.kind not in "df":
            continue
        parent, name = parent_and_name(rel)
        fd = open_dir(parent, up, dev=None) if rel != "." else os.dup(up)
        try:
            flags = _DIR if entry.kind == "d" else _FILE
            src = os.open(name, flags | os.O_NONBLOCK, dir_fd=fd) if rel != "." else os.dup(fd)
            try:
                if attrs := _xattrs(src):
                    xattrs[rel] = {k: base64.b64encode(v).decode() for k, v in attrs.items()}
                if entry.kind == "f":
                    _copy(src, os.open(blobs / _blob(rel), _NEW, 0o600))
            finally:
                os.close(src)
        finally:
            os.close(fd)
    return xattrs


def _open_bind(root: int, rel: str, flags: int) -> tuple[int, os.stat_result]:
    """An fd (and its stat) of the bind-mounted regular file ``rel``, reached from ``root``
    without following a symlink."""
    parent, name = parent_and_name(rel)
    fd = open_dir(parent, root, dev=os.fstat(root).st_dev)
    try:
        file = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    st = os.fstat(file)
    if not stat.S_ISREG(st.st_mode):
        os.close(file)
        raise Unsupported(f"/{rel} is not a regular file")
    return file, st


def read_bind(root: int, rel: str) -> list[Any]:
    """``rel``'s content (base64), mode, uid and gid."""
    src, st = _open_bind(root, rel, os.O_RDONLY)
    try:
        data = b""
        while chunk := os.read(src, 1 << 16):
            data += chunk
    finally:
        os.close(src)
    return [base64.b64encode(data).decode(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]


def write_bind(root: int, rel: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Give ``rel`` that content, mode and owner (written only where they differ)."""
    dst, st = _open_bind(root, rel, os.O_RDWR)
    try:
        if os.pread(dst, len(data) + 1, 0) != data:
            os.ftruncate(dst, 0)
            os.pwrite(dst, data, 0)
        if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (mode, uid, gid):
            os.fchown(dst, uid, gid)
            os.fchmod(dst, mode)
    finally:
        os.close(dst)
