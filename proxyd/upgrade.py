"""Upgrading in place: the master re-executes the proxyd now installed, keeping its pid.

Before it lets go of anything the running master asks the new program whether it can
start and take over (`PROGRAM --upgrade-check ARGS`: it loads the same configuration
and prints the handover versions it reads). Only then does it write the handover
document (proxyd/handover.py), leave the descriptors the document names open across
the exec, block its signals (a TERM arriving meanwhile waits for the new program's
handler instead of killing the process) and execve(2) the same command line. If the
exec itself fails, everything is put back and the old program goes on serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from proxyd import handover

CHECK_TIMEOUT = 30.0  # seconds the new program may take to say it can take over
CHECK_FLAG = "--upgrade-check"


def program() -> list[str]:
    """The command that started this process, to start again: the `proxyd` script it
    was run as (a package upgrade replaces what that path runs), else this Python with
    `-m proxyd`."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) != "__main__.py" and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "proxyd"]


def check(command: list[str], argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """(why the new program cannot take over or None, what it said of itself)."""
    try:
        done = subprocess.run(
            [*command, CHECK_FLAG, *argv],
            capture_output=True,
            timeout=CHECK_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"the new program cannot be run: {e}", {}
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    if done.returncode != 0:
        last = lines[-1] if lines else f"exit code {done.returncode}"
        return f"the new program refuses to start: {last}", {}
    try:
        said = json.loads(done.stdout)
        versions = said["handover_versions"]
    except (ValueError, KeyError, TypeError):
        return "the new program does not know --upgrade-check (too old to take over)", {}
    if handover.VERSION not in versions:
        return (
            f"the new program reads handover versions {versions}, this one writes "
            f"{handover.VERSION}",
            said,
        )
    return None, said


def execute(
    command: list[str], argv: list[str], document: dict[str, Any], mask: Iterable[int]
) -> str:
    """Replace this process by `command argv` with `document` handed over. Returns only
    if that failed, with why; everything it changed is then put back."""
    keep = handover.descriptors(document)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, list(mask))
    fd = -1
    try:
        fd = handover.write(document)
        for kept in keep:
            os.set_inheritable(kept, True)
        env = dict(os.environ, **{handover.ENV: str(fd)})
        os.execve(command[0], [*command, *argv], env)
    except OSError as e:
        reason = f"exec {command[0]}: {e.strerror or e}"
    for kept in keep:
        os.set_inheritable(kept, False)
    if fd >= 0:
        os.close(fd)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return reason
