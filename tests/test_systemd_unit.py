"""conf/proxyd.service, checked with systemd's own tools.

systemd does not run as PID 1 here, so nothing starts the unit itself (and no test
pretends to): `systemd-analyze verify` has no complaint, and the restart and stop
directives are the ones the README describes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.proxyclient import CHECKOUT

UNIT = CHECKOUT / "conf" / "proxyd.service"
BIN = Path(sys.executable).parent  # the environment running the tests has proxyd


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order; keys may repeat (systemd
    merges DeviceAllow=, SystemCallFilter=, ...)."""
    found, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(key: str, section: str = "Service") -> list[str]:
    """Every value assigned to `key` in the shipped unit."""
    return [v for s, k, v in directives(UNIT.read_text()) if (s, k) == (section, key)]


def value(key: str) -> str:
    """The one value of `key` in [Service]; fails if it is missing or repeated."""
    (found,) = values(key)
    return found


def installable_copy(tmp: Path) -> Path:
    """The shipped unit, its ExecStart binary pointing at this environment's proxyd
    (systemd-analyze checks that it exists); nothing else changes."""
    unit = tmp / "proxyd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/proxyd", str(BIN / "proxyd")))
    return unit


# --- the unit as systemd reads it ----------------------------------------------------------


def test_verify_has_no_complaint(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", installable_copy(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values too: every complaint is on stderr.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_restart_and_stop_semantics_kept() -> None:
    assert value("Type") == "simple"
    assert value("ExecStart") == "/usr/local/bin/proxyd -n --config /etc/proxyd/proxyd.toml"
    assert value("ExecReload") == "/bin/kill -HUP $MAINPID"
    # TERM to the master alone, SIGKILL to the whole cgroup after TimeoutStopSec.
    assert (value("KillMode"), value("KillSignal")) == ("mixed", "SIGTERM")
    assert value("Restart") == "on-failure"
    assert value("RestartPreventExitStatus").split() == ["2", "3", "4"]
    assert value("RuntimeDirectory") == "proxyd"
