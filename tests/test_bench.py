"""The benchmark's smoke mode: every figure is produced (the values are not judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.proxyclient import CHECKOUT


def test_bench_smoke_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(CHECKOUT / "scripts" / "bench"), "--smoke", "--out", str(out)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((out / "results.json").read_text())
    for placement in ("per_type", "per_type_one_cpu"):  # client and server on two CPUs, one
        assert set(figures[placement]) == {
            "lstat",
            "open",
            "create+remove",
            "mkdir+remove",
            "readlink",
            "lgetxattr",
            "chmod",
            "mixed",
        }
        for kinds in figures[placement].values():
            for kind in ("proxyd", "reference"):
                assert kinds[kind]["rtt_us"]["median"] > 0
                # Nanosecond run times: every server ran for every request type.
                assert kinds[kind]["cpu_us"]["median"] > 0
    assert set(figures["aggregate"]) == {"1", "4"}
    assert all(v[k]["median"] > 0 for v in figures["aggregate"].values() for k in v)
    assert set(figures["audit"]) == {"none", "mutations", "all"}
    assert set(figures["metrics"]["figures"]) == {
        f"{w}, {p}" for w in ("lstat", "mixed") for p in ("two CPUs", "one CPU")
    }
    for settings in figures["metrics"]["figures"].values():
        assert all(settings[s]["cpu_us"]["median"] > 0 for s in ("reference", "off", "on"))
        assert all(settings["ratio"][s]["median"] > 0 for s in ("off", "on"))
    assert figures["metrics"]["scrape_ms"]["median"] > 0
    assert figures["crash"]["kills"] > 0 and figures["crash"]["median_ms"] > 0
    assert figures["memory"]["1"]["worker_uss_mb"] > 0
    assert figures["memory"]["reference_helper_rss_mb"] > 0
    assert figures["guest"]["proxyd"]["median"] > 0 and figures["guest"]["reference"]["median"] > 0
    report = (out / "results.md").read_text()
    headings = ("two CPUs", "one CPU", "Aggregate", "Audit cost", "Metrics cost", "crash")
    for heading in (*headings, "Memory", "guest"):
        assert heading in report


def test_bench_only_runs_the_figures_named(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, str(CHECKOUT / "scripts" / "bench"), "--smoke", "--out", str(out)]
    result = subprocess.run(
        [*argv, "--only", "metrics"], cwd=CHECKOUT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads((out / "results.json").read_text())) == {"machine", "metrics"}
    report = (out / "results.md").read_text()
    assert "Metrics cost" in report and "Aggregate" not in report
    wrong = subprocess.run(
        [*argv, "--only", "metric"], cwd=CHECKOUT, capture_output=True, text=True, timeout=600
    )
    assert wrong.returncode == 2 and "--only: no figure named metric" in wrong.stderr
