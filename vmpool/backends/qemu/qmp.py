"""The QEMU monitor (QMP over the machine's unix socket, through ``qemu.qmp``), used
synchronously: each call opens one connection, runs its commands in order and closes it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from vmpool.backends.qemu.records import Record
from vmpool.errors import BackendError

T = TypeVar("T")

QMP_TIMEOUT = 10.0

Command = tuple[str, Mapping[str, object] | None]


def qmp(record: Record, command: str, arguments: Mapping[str, object] | None,
        timeout: float = QMP_TIMEOUT) -> object:
    """Run one QMP command and return its reply's ``return``."""
    return qmp_all(record, [(command, arguments)], timeout)[0]


def qmp_all(record: Record, commands: Sequence[Command], timeout: float) -> list[object]:
    """Run QMP commands in order over one connection, all within ``timeout``."""
    sock = record.qmp_sock
    what = ", ".join(command for command, _ in commands)

    async def go() -> list[object]:
        client = QMPClient(f"vmpool-{record.name}")
        await client.connect(str(sock))
        try:
            return [await client.execute(command, args) for command, args in commands]
        finally:
            # disconnect() re-raises whatever ended the connection (EOF after `quit`)
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    try:
        return _run_async(asyncio.wait_for(go(), timeout))
    except TimeoutError as exc:
        raise BackendError(
            f"qemu machine {record.name}: QMP {what} timed out after {timeout:g}s"
        ) from exc
    except (QMPError, OSError, EOFError) as exc:
        raise BackendError(
            f"qemu machine {record.name}: QMP {what} failed: {exc or type(exc).__name__}"
        ) from exc


def hmp(record: Record, command: str, timeout: float) -> str:
    """Run a human-monitor command through QMP; any output from savevm/loadvm is an error."""
    reply = qmp(record, "human-monitor-command", {"command-line": command}, timeout)
    output = reply if isinstance(reply, str) else ""
    if output.strip():
        raise BackendError(f"qemu machine {record.name}: `{command}` failed: {output.strip()}")
    return output


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, or in a helper thread when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
