"""Removing machines: each container with its anonymous volumes, the holder of its network
namespace (vmpool.backends.podman.api_reset), its warm and stale images, and what the backend
keeps beside it.

Through the API service while the backend object holds one (vmpool.backends.podman.channel):
the containers' cgroups are SIGKILLed from the host first (a removal then waits for no
process), the containers deleted in parallel, machines before their holders, then every image
in one request. Otherwise one ``rm`` for all the containers and one ``image rm`` for all the
images: a tool process costs about as much as the removal itself.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from vmpool.backends.base import validate_name
from vmpool.backends.podman import api
from vmpool.backends.podman.api_reset import holder_name, holders
from vmpool.backends.podman.channel import ApiChannel
from vmpool.backends.podman.image import warm_image_name
from vmpool.backends.podman.live_reset import LiveReset
from vmpool.backends.podman.records import MachineRecord, RecordStore, may_have_warm_image
from vmpool.backends.podman.tool import Tool
from vmpool.errors import BackendError

log = logging.getLogger(__name__)

#: containers deleted at once through the API (each deletion is mostly podman's own work)
_PARALLEL = 8


class Removal:
    """Removes one backend's machines; ``forget(name)`` drops what the backend keeps of one."""

    def __init__(self, tool: Tool, records: RecordStore, channel: ApiChannel | None,
                 live: LiveReset | None, forget: Callable[[str], None]) -> None:
        self._tool = tool
        self._records = records
        self._channel = channel
        self._live = live
        self._forget = forget

    def delete(self, name: str) -> None:
        """Remove the machine (a missing one is no error); BackendError when it stays."""
        errors = self.delete_many([name])
        if errors:
            raise BackendError(errors[name])

    def delete_many(self, names: Iterable[str]) -> dict[str, str]:
        """Remove ``names``; ``{name: error}`` for those that could not be removed."""
        names = sorted({validate_name(n) for n in names})
        if not names:
            return {}
        records = {n: self._records.load(n) for n in names}
        held = self.holders(records)
        # from the host, at once: the removal then waits for no process to stop
        killed = {n for n in names if self._live is not None and self._live.kill(n)}
        errors = self._remove_api(names, held, killed)
        if errors is None:
            errors = self._remove_cli(names, held)
        gone = [n for n in names if n not in errors]
        images = [warm_image_name(n) for n in gone if may_have_warm_image(records[n])]
        images += [i for n in gone if (r := records[n]) is not None for i in r.stale_images]
        if images:
            self._remove_images(images)
        for name in gone:
            self._forget(name)
        return errors

    def holders(self, records: Mapping[str, MachineRecord | None]) -> list[str]:
        """The holders the machines may have: networked ones, and any whose record is lost."""
        if not self._tool.is_podman:
            return []
        return holders([n for n, r in records.items() if r is None or r.network])

    def holder_of(self, record: MachineRecord, inspect: Callable[[str], dict[str, object] | None]
                  ) -> str | None:
        """The running holder of the machine's network namespace, if it has one."""
        if not record.network or not self._tool.is_podman:
            return None
        holder = holder_name(record.name)
        info = inspect(holder)
        state = info.get("State") if info else None
        return holder if isinstance(state, dict) and state.get("Running") else None

    def drop_stale_images(self, record: MachineRecord, *, keep_current: bool = True) -> None:
        """Remove the warm images an earlier snapshot left that no container uses now."""
        if not record.stale_images:
            return
        record.stale_images = [
            image for image in record.stale_images
            if not self._tool.remove_image(image, missing_ok=True)
        ]
        if keep_current:
            self._records.write(record)

    # -- through the API ---------------------------------------------------------------------
    def _remove_api(self, names: Sequence[str], held: Sequence[str], killed: set[str]
                    ) -> dict[str, str] | None:
        """The containers removed through the service; None when the CLI must do it all."""
        if self._channel is None or (client := self._channel.client()) is None:
            return None
        timeout = self._channel.timeout
        failed: dict[str, str] = {}
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(_PARALLEL, len(names) + len(held)),
            thread_name_prefix="vmpool-remove",
        ) as pool:
            # machines first: a holder goes once no machine is left in its namespace
            for batch in (names, held):
                # a remote host's pids are not this machine's: no kill from here
                futures = {n: pool.submit(api.remove, client, n, timeout=timeout,
                                          killed=n in killed or self._tool.remote)
                           for n in batch}
                for name, future in futures.items():
                    try:
                        future.result()
                    except api.ApiError as exc:
                        failed[name] = str(exc)
                    except BackendError as exc:  # no answer: the CLI does it all
                        log.warning("removal through the podman API failed (the CLI "
                                    "instead): %s", exc)
                        self._channel.lost(client)
                        return None
        # what podman's API refused, the CLI tries (its error is the one kept)
        errors: dict[str, str] = {}
        for name in failed:
            log.info("removing %s through the podman API failed: %s", name, failed[name])
            try:
                self._tool.remove_container(name)
            except BackendError as exc:
                if name in names:
                    errors[name] = str(exc)
        return errors

    def _remove_images(self, images: list[str]) -> None:
        """Best effort, as an image left is not a machine."""
        if self._channel is not None:
            left = self._channel.call("image rm", lambda c: c.remove_images(images))
            if left is not None:
                for error in left:
                    log.debug("image left: %s", error)
                return
        rm = ["image", "rm", "--ignore"] if self._tool.is_podman else ["image", "rm"]
        if self._tool.run(*rm, *images).returncode != 0:
            for image in images:
                self._tool.remove_image(image, missing_ok=True)

    # -- through the CLI ---------------------------------------------------------------------
    def _remove_cli(self, names: Sequence[str], held: Sequence[str]) -> dict[str, str]:
        # --ignore: podman 4.3's `rm -f` given several names, one of them missing, exits 0 and
        # removes none of them; -v: with the anonymous volumes the image declares
        args = ["rm", "-f", "-v", "-t", "0", "--ignore"] if self._tool.is_podman \
            else ["rm", "-f", "-v"]
        if held:  # --depend: a holder goes after the machine in its namespace
            args.append("--depend")
        result = self._tool.run(*args, *names, *held)
        errors: dict[str, str] = {}
        if result.returncode != 0:
            # which one failed (or was merely missing: docker says so)? ask one by one
            for name in names:
                try:
                    self._tool.remove_container(name)
                except BackendError as exc:
                    errors[name] = str(exc)
        return errors
