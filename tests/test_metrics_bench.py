"""``bench/hub_bench.py`` runs (a small load, a second or so per phase): its modes, its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("aiohttp")
pytest.importorskip("psutil")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hub_bench.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hub_bench_runs_small(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [sys.executable, str(BENCH), "--seconds", "0.5", "--rounds", "1", "--servers", "20", "--clients", "2"]
    argv += ["--modes", "off,metrics", "--latency-seconds", "0.5", "--attribution", "200", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    off, metrics = report["modes"]["off"], report["modes"]["metrics"]
    assert off["grants_per_s"] > 0 and metrics["grants_per_s"] > 0
    scrape = metrics["http"]["/metrics"]
    assert scrape["requests"] > 0 and scrape["errors"] == 0 and scrape["p99_ms"] > 0
    assert set(report["ratios"]) == {"metrics"}
    assert {"none", "events", "metrics"} <= set(report["attribution"])
    assert "x" in done.stdout and "GET /metrics" in done.stdout
