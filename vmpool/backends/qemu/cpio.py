"""A cpio "newc" archive writer, enough for the guest's initramfs (vmpool.backends.qemu.image):
directories, files, symlinks and device nodes, made without root."""

from __future__ import annotations

import io
import os
import stat


class Cpio:
    """A minimal cpio "newc" writer: enough for an initramfs, no root needed for device nodes."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1000
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0
        )
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        self._buf.write(header + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._seen:
            return
        parent = os.path.dirname(name)
        if parent:
            self.directory(parent)
        self._seen.add(name)
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._seen.add(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if name in self._seen:
            return
        self.directory(os.path.dirname(name))
        self._seen.add(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._seen.add(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()
