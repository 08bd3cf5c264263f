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
    # what explains a slow reading: the server process's collections, the hypervisor's steal
    assert set(result["server_process_gc"]) == {"0", "1", "2"}
    assert "garbage collections in the lease server's process" in run.stdout
    assert result["steal_pct"] is None or 0 <= result["steal_pct"] <= 100


def test_a_baseline_runs_in_turns_with_this_code(tmp_path: Path) -> None:
    """--baseline runs another checkout's benchmark (here: this very one) in turns with this
    code's and prints both, with the ratio of their median p99."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "checkout_latency.py"), "--procs", "2",
         "--machines", "4", "--iterations", "20", "--baseline", str(ROOT), "--rounds", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| this", "| baseline"))]
    assert [r.split("|")[1].strip() for r in rows] == ["this", "baseline"] * 2
    assert "this / baseline = " in run.stdout


def test_a_baseline_without_the_benchmark_is_refused(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "checkout_latency.py"), "--baseline",
         str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 2 and f"--baseline {tmp_path}: no bench/checkout_latency.py" in (
        run.stderr
    )
