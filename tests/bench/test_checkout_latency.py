"""bench/checkout_latency.py runs as README says and reports what it measured (no timing is
asserted here: speed is shown by running the benchmark, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_latency_benchmark_runs_and_reports_every_cycle(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "checkout_latency.py"),
            "--procs",
            "3",
            "--machines",
            "4",
            "--iterations",
            "30",
            "--json",
            str(out),
            "--state-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "| checkout+checkin |" in run.stdout
    assert "p99(checkout+checkin) <= 2 ms:" in run.stdout
    assert "minimal server" in run.stdout
    result = json.loads(out.read_text())
    assert result["cycles"] == 3 * 30
    assert result["pool_checkouts"] >= 3 * 30  # the warm-up cycles count too
    assert result["server"]["ops"] >= 2 * 3 * 30  # a check-out and a check-in per cycle
    cycle = result["ms"]["checkout+checkin"]
    assert 0 < cycle["p50"] <= cycle["p99"] <= cycle["max"]
    assert result["floor_minimal_server_ms"]["p50"] > 0
    # the temporary state directory went with the pool
    assert not list(tmp_path.glob("vmpool-bench-*"))
