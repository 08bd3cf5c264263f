"""QEMU Debian machines: a fresh machine per test by snapshot reset versus a cold boot per test.

    python -m bench.qemu_debian_reset                   # 2 cold boots, 10 resets
    python -m bench.qemu_debian_reset --boots 3 --resets 20 --json out.json

``boot``: what a per-test fixture without a pool pays per test: create, start, wait until ready
(systemd running, identity and key set, sshd answering), delete. ``reset``: what the pool pays
between two tests on one machine: loadvm of the ready snapshot, guest-sync, guest-set-time;
before each reset (untimed) the machine gets dirty (a file written, a unit stopped) and after it
the file is checked gone. The ratio is of medians. Needs the QEMU Debian image
(`vmpool image build --backend qemu --distro debian`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench._common import markdown_table
from vmpool.backends.base import MachineSpec
from vmpool.backends.qemu import QemuBackend
from vmpool.config_backends import QemuSettings

_READY_TIMEOUT = 600.0
_DIRT = "touch /root/vmpool-bench-dirt && systemctl stop cron.service 2>/dev/null; true"


def cold_boot(backend: QemuBackend) -> float:
    name = f"benchdeb-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        backend.create(MachineSpec(name, {"bench": "qemu-debian"}))
        backend.start(name)
        backend.wait_ready(name, _READY_TIMEOUT)
    finally:
        backend.delete(name)
    return time.monotonic() - started


def resets(backend: QemuBackend, count: int) -> list[float]:
    name = f"benchdeb-{uuid.uuid4().hex[:8]}"
    out: list[float] = []
    try:
        backend.create(MachineSpec(name, {"bench": "qemu-debian"}))
        backend.start(name)
        backend.wait_ready(name, _READY_TIMEOUT)
        backend.snapshot(name)
        for _ in range(count):
            if not backend.exec(name, ["sh", "-c", _DIRT], 60).ok:
                raise SystemExit("could not dirty the machine before a reset")
            started = time.monotonic()
            backend.reset(name)
            out.append(time.monotonic() - started)
            left = backend.exec(name, ["test", "-e", "/root/vmpool-bench-dirt"], 60)
            if left.ok:
                raise SystemExit("reset left the file written before it")
    finally:
        backend.delete(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=2, help="cold boots (each 20-60 s)")
    parser.add_argument("--resets", type=int, default=10, help="snapshot resets")
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm", "auto"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vmpool-bench-qdeb-") as tmp:
        backend = QemuBackend(QemuSettings(distro="debian", accel=args.accel), Path(tmp))
        backend.check()
        reset_s = resets(backend, args.resets)
        boot_s = [cold_boot(backend) for _ in range(args.boots)]
    boot, reset = statistics.median(boot_s), statistics.median(reset_s)
    rows = [
        ["cold boot per test", len(boot_s), f"{min(boot_s):.2f}", f"{boot:.2f}",
         f"{max(boot_s):.2f}", "1x"],
        ["snapshot reset per test", len(reset_s), f"{min(reset_s):.3f}", f"{reset:.3f}",
         f"{max(reset_s):.3f}", f"**{boot / reset:.0f}x** less"],
    ]
    print(markdown_table(["QEMU Debian, machine overhead", "n", "min s", "median s", "max s",
                          "vs cold boot"], rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"boot_s": boot_s, "reset_s": reset_s,
                                         "ratio": boot / reset}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
