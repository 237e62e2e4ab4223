"""The benchmark's smoke mode: every figure is produced, and every one is plausible.

Speed targets are scripts/bench's business, not this test's: the bounds below are what no
working measurement on any machine of this kind can exceed (a loaded 2-core machine
included), so that a figure that is zero, negative, swapped or absurd fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.proxyclient import CHECKOUT

# What scripts/bench --smoke asks for (its main()): workers killed for the crash figure,
# and the clients of the memory figure.
SMOKE_KILLS = 6
SMOKE_CLIENTS = ("1", "2")
# Sane bounds, far beyond any figure measured: a round trip averaging 50 ms would be a
# server asleep, not a slow one; a request cannot cost 10 ms of CPU; a worker dead 5 s
# before its connection is served again has lost it; a proxyd process of 200 MB or a
# reference helper of 64 MB is not these programs; the guest run is cut at 300 s; a TCG
# guest over 9p moves nowhere near 1000 MB/s through dbench or creates 100 000 files/s.
MAX_RTT_US = 50_000
MAX_CPU_US = 10_000
MAX_CRASH_MS = 5_000
MAX_PROXYD_MB, MAX_REFERENCE_MB = 200, 64
MAX_GUEST_S = 300
MAX_DBENCH_MB_S, MAX_FS_MARK_FILES_S = 1000, 100_000
# proxyd's CPU per request is a few times the C reference's, never 100 times; a scrape of
# the metrics endpoint taking 5 s is a hung endpoint.
MAX_RATIO, MAX_SCRAPE_MS = 100, 5_000


def spread(figure: dict[str, float], low: float, high: float) -> float:
    """A figure's {median, min, max}, checked: ordered and within (low, high). Its median."""
    assert low < figure["min"] <= figure["median"] <= figure["max"] < high, figure
    return figure["median"]


def test_bench_smoke_figures_are_plausible(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(CHECKOUT / "scripts" / "bench"), "--smoke", "--out", str(out)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures: dict[str, Any] = json.loads((out / "results.json").read_text())

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
        for name, kinds in figures[placement].items():
            assert set(kinds) == {"proxyd", "reference"}, name
            for kind, measured in kinds.items():
                rtt = spread(measured["rtt_us"], 0, MAX_RTT_US)
                # Nanosecond run times (schedstat), so > 0 over the smoke's 50 requests.
                # A server pinned to one CPU cannot run longer than the wall time of the
                # requests it served (the CPU is read a little before and after the
                # timed loop, and a master tick may fall in between: half again).
                cpu = spread(measured["cpu_us"], 0, MAX_CPU_US)
                assert cpu <= 1.5 * rtt, (placement, name, kind, measured)

    # The floor: the reference, proxyd and scripts/floor.c, on the requests floor.c answers
    # (each a reply the client decoded: a descriptor for OPEN, a stat record for LSTAT).
    assert set(figures["floor"]) == {"lstat", "open", "readlink", "lgetxattr", "chmod", "mixed"}
    for name, kinds in figures["floor"].items():
        assert set(kinds) == {"reference", "proxyd", "floor"}, name
        for cpu in kinds.values():
            spread(cpu, 0, MAX_CPU_US)

    assert set(figures["aggregate"]) == {"1", "4"}
    for conns, kinds in figures["aggregate"].items():
        assert set(kinds) == {"proxyd", "reference"}, conns
        for rate in kinds.values():  # requests/s: at least one per MAX_RTT_US
            spread(rate, 1e6 / MAX_RTT_US, 1e7)

    assert set(figures["audit"]) == {"none", "mutations", "all"}
    for cpu in figures["audit"].values():
        spread(cpu, 0, MAX_CPU_US)

    # The cost of metrics: the reference and proxyd with metrics off and on, each a
    # pinned server's CPU and round trip as above; proxyd / reference within (0, 100);
    # one scrape of the endpoint.
    assert set(figures["metrics"]["figures"]) == {
        f"{w}, {p}" for w in ("lstat", "mixed") for p in ("two CPUs", "one CPU")
    }
    for name, settings in figures["metrics"]["figures"].items():
        for setting in ("reference", "off", "on"):
            rtt = spread(settings[setting]["rtt_us"], 0, MAX_RTT_US)
            cpu = spread(settings[setting]["cpu_us"], 0, MAX_CPU_US)
            assert cpu <= 1.5 * rtt, (name, setting, settings[setting])
        for setting in ("off", "on"):
            spread(settings["ratio"][setting], 0, MAX_RATIO)
    spread(figures["metrics"]["scrape_ms"], 0, MAX_SCRAPE_MS)

    crash = figures["crash"]
    assert crash["kills"] == SMOKE_KILLS, crash  # every kill found a busy worker
    assert 0 < crash["median_ms"] <= crash["p99_ms"] <= crash["max_ms"] < MAX_CRASH_MS, crash

    memory = figures["memory"]
    for clients in SMOKE_CLIENTS:
        m = memory[clients]
        assert m["workers"] == int(clients) + 1, m  # one per client and the spare (min_idle 1)
        assert 0 < m["worker_uss_mb"] <= m["worker_pss_mb"] <= m["worker_rss_mb"], m
        assert m["worker_rss_mb"] < MAX_PROXYD_MB and 0 < m["master_rss_mb"] < MAX_PROXYD_MB, m
    assert 0 < memory["reference_helper_uss_mb"] <= memory["reference_helper_rss_mb"]
    assert memory["reference_helper_rss_mb"] < MAX_REFERENCE_MB

    assert set(figures["guest"]) == {"proxyd", "reference"}
    for seconds in figures["guest"].values():
        spread(seconds, 0, MAX_GUEST_S)

    # dbench's and fs_mark's own throughput in the guest: each ran on both servers and
    # reported a figure above 0 (scripts/bench raises if one failed or said nothing).
    programs = figures["guest_programs"]
    assert set(programs) == {"dbench", "fs_mark"}
    for name, unit, high in (
        ("dbench", "MB/s", MAX_DBENCH_MB_S),
        ("fs_mark", "files/s", MAX_FS_MARK_FILES_S),
    ):
        assert programs[name]["unit"] == unit, programs[name]
        for kind in ("proxyd", "reference"):
            spread(programs[name][kind], 0, high)

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
