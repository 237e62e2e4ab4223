"""Logging set-up: structlog, one line per event, JSON by default.

Every line is written with a single write(2) so that lines from several processes
sharing stderr never interleave. In daemon mode (no -n) lines go to syslog instead,
as the reference helper's do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import syslog
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "console")


class _FdWriter:
    """A structlog logger that writes each rendered line with one os.write."""

    def __init__(self, fd: int = 2) -> None:
        self._fd = fd

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError):  # a closed stderr must not stop the server
            os.write(self._fd, (message + "\n").encode("utf-8", "backslashreplace"))

    debug = info = warning = error = critical = exception = msg


class _SyslogWriter:
    """A structlog logger for daemon mode: one syslog(3) message per event."""

    def _at(priority: int):  # type: ignore[misc]
        def write(self: _SyslogWriter, message: str) -> None:
            syslog.syslog(priority, message)

        return write

    debug = _at(syslog.LOG_DEBUG)
    info = msg = _at(syslog.LOG_INFO)
    warning = _at(syslog.LOG_WARNING)
    error = exception = _at(syslog.LOG_ERR)
    critical = _at(syslog.LOG_CRIT)
    del _at


def configure(fmt: str = "json", level: str = "info", *, to_syslog: bool = False) -> None:
    """Set up structlog for this process (call again in a child after fork)."""
    if to_syslog:
        # Connect now (LOG_NDELAY): once chrooted, /dev/log is out of reach.
        syslog.openlog("proxyd", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)
        writer: Any = _SyslogWriter()
    else:
        writer = _FdWriter(2)
    if fmt == "console":
        renderer: Any = structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event"], drop_missing=True
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[Any] = [structlog.processors.add_log_level]
    if not to_syslog:  # syslog stamps its own time
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )


def get(**context: Any) -> Any:
    """A logger with `context` bound to every event, and this process's pid."""
    return structlog.get_logger().bind(pid=os.getpid(), **context)
