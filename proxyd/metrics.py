"""Prometheus metrics: what the master sees and what the workers served, exposed over
HTTP (`[daemon] metrics_listen`) and in a file (`metrics_file`). docs/metrics.md lists
every metric and its labels.

The master counts what it sees (connections, deaths, recoveries, ...) here, by export.
Each worker counts its replies in its journal's metrics area (proxyd/slot.py) with
plain stores, never a message: at scrape time the master sums the areas of the live
workers and what exited workers had counted (folded into per-export totals when each is
reaped). Both are handed over in an upgrade, so no counter goes backwards; a master
that dies takes them with it, and the next one starts from zero, as Prometheus expects
of a restarted target.

The master forks workers, so it starts no thread: the endpoint is a non-blocking socket
in its selector loop. A scraper has CLIENT_DEADLINE seconds for its whole exchange, and
the answer is sent as its socket takes it: a slow or hostile one costs only itself.
prometheus_client makes the text format (a collector yielding metric families built at
scrape time); it is imported only when metrics are on, at start (its import costs
~0.1 s, which the master's loop should not spend at the first scrape).
"""

from __future__ import annotations

import collections
import contextlib
import operator
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxyd import __version__, log, slot
from proxyd import protocol as p
from proxyd.config import Config, ConfigError, listen_address, metrics_on
from proxyd.pool import BUSY, IDLE, RETIRING, STARTING, Worker

if TYPE_CHECKING:
    from proxyd.master import Master

# --- what the master counts, and the label values it uses (bounded sets) ------------------

REFUSAL_REASONS = ("not_allowed", "uid_limit", "unavailable", "no_descriptors", "other")
# A connection's closing reason, as the `connection closed` line says it -> label value.
CLOSE_REASONS = {
    "eof": "eof",
    "eof mid-request": "eof_mid_request",
    "stalled": "stalled",
    "peer not reading": "peer_not_reading",
    "protocol error": "protocol_error",
    "peer gone": "peer_gone",
    "socket error": "socket_error",
    "poison": "poison",
    "crash, reply state unknown": "reply_state_unknown",
    "daemon stopping": "daemon_stopping",
    "daemon stopped": "daemon_stopping",
    "export removed": "export_removed",
    "export unavailable": "export_unavailable",
}
DEATH_SIGNALS = ("SIGKILL", "SIGABRT", "SIGSEGV", "SIGBUS", "SIGSYS", "SIGILL", "SIGFPE")
# A `crash recovery` outcome -> what the guest saw (`reply state unknown`: closed).
VERDICTS = {
    "nothing was in flight": "invisible",
    "partly received request handed on": "invisible",
    "received request handed on": "invisible",
    "request executed again": "invisible",
    "reply had been sent": "invisible",
    "answered EIO": "eio",
    "reply state unknown": "closed",
    "died while receiving": "closed",
    "journal unreadable": "closed",
}
WATCHDOG_REASONS = ("hung", "unresponsive")

# Counters of events, by export: metric -> (help, label, its values or () for none).
EVENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "proxyd_connections_accepted": (
        "Connections accepted on the export's socket and admitted (peer checks passed).",
        "",
        (),
    ),
    "proxyd_connections_refused": (
        "Connections refused, by reason: not_allowed (allow_uids/allow_gids), uid_limit "
        "(max_connections_per_uid), unavailable (the export cannot be served), "
        "no_descriptors (the master ran out of file descriptors).",
        "reason",
        REFUSAL_REASONS,
    ),
    "proxyd_connections_closed": (
        "Connections closed, by reason (the `connection closed` line's reason).",
        "reason",
        (*sorted(set(CLOSE_REASONS.values())), "other"),
    ),
    "proxyd_worker_deaths": (
        "Workers that died unexpectedly, by cause: the signal that killed them, "
        "other_signal, exit (an exit code), unknown (adopted: no status).",
        "cause",
        (*DEATH_SIGNALS, "other_signal", "exit", "unknown"),
    ),
    "proxyd_crash_recoveries": (
        "Connections recovered after their worker died, by what the guest saw: invisible "
        "(nothing), eio (-EIO for a request that may have run), closed (the reply's fate "
        "was unknown). Poison closures are counted apart.",
        "verdict",
        ("invisible", "eio", "closed"),
    ),
    "proxyd_poison_closures": (
        "Connections closed because the same request killed 3 workers within 60 s.",
        "",
        (),
    ),
    "proxyd_watchdog_kills": (
        "Workers killed by the watchdog: hung (a request ran past request_timeout), "
        "unresponsive (request bytes waited request_timeout untaken).",
        "reason",
        WATCHDOG_REASONS,
    ),
}


def refusal_reason(reason: str) -> str:
    """The label value of a refusal, from the `connection refused` line's reason."""
    if reason.startswith("export unavailable"):
        return "unavailable"
    if reason.startswith("not in allow_uids"):
        return "not_allowed"
    if reason.startswith("peer uid already holds"):
        return "uid_limit"
    if reason.startswith("out of file descriptors"):
        return "no_descriptors"
    return "other"


def death_cause(status: int | None) -> str:
    """The label value of a worker's death from its wait status (None: not our child)."""
    if status is None:
        return "unknown"
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return name if name in DEATH_SIGNALS else "other_signal"
    return "exit"


class Events:
    """Counts of what the master sees, by (metric, export, label value); the master's
    collaborators (recovery.py, sockets.py) count into the master's through it."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def accepted(self, export: str) -> None:
        self.counts["proxyd_connections_accepted", export, ""] += 1

    def refused(self, export: str, reason: str) -> None:
        """`reason`: as the `connection refused` line says it."""
        self.counts["proxyd_connections_refused", export, refusal_reason(reason)] += 1

    def closed(self, export: str, reason: str) -> None:
        """`reason`: as the `connection closed` line says it."""
        label = CLOSE_REASONS.get(reason.split(":")[0], "other")
        self.counts["proxyd_connections_closed", export, label] += 1

    def died(self, export: str, status: int | None) -> None:
        """An unexpected death; `status` as os.waitpid gives it (None: not our child)."""
        self.counts["proxyd_worker_deaths", export, death_cause(status)] += 1

    def recovered(self, export: str, outcome: str) -> None:
        """`outcome`: the `crash recovery` line's, or `reply state unknown`."""
        self.counts["proxyd_crash_recoveries", export, VERDICTS.get(outcome, "closed")] += 1

    def poisoned(self, export: str) -> None:
        self.counts["proxyd_poison_closures", export, ""] += 1

    def watchdog_killed(self, export: str, reason: str) -> None:
        """`reason`: recovery.HUNG or recovery.UNRESPONSIVE."""
        self.counts["proxyd_watchdog_kills", export, reason] += 1


# --- the HTTP endpoint ------------------------------------------------------------------------

MAX_REQUEST = 8192  # bytes of request line and headers read at most
CLIENT_DEADLINE = 10.0  # seconds a scraper has for its whole exchange (Prometheus' timeout)
MAX_CLIENTS = 32  # scrapers served at once; one more ends the one that came first
ACCEPT_BATCH = 16  # connections accepted per wake-up


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on `listen` ("HOST:PORT", config.listen_address),
    non-blocking and close-on-exec. Raises ConfigError naming daemon.metrics_listen when
    it cannot be bound (EADDRINUSE: another socket listens there; EADDRNOTAVAIL: not an
    address of this host; EAFNOSUPPORT: a service confined to Unix sockets, such as
    conf/proxyd.service without its metrics drop-in)."""
    host, port = listen_address(listen)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"daemon.metrics_listen: {listen}: {e.strerror}") from None
    try:
        # A restart binds again at once past the last scrape's TIME_WAIT; on Linux a
        # socket still listening there is refused all the same.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise ConfigError(f"daemon.metrics_listen: {listen}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def http_response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class _Client:
    deadline: float  # monotonic
    received: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None  # the answer still to send


class Endpoint:
    """Answers `GET /metrics` (404 to anything else) on `sock`, a listening socket
    (`address`: its metrics_listen), from the master's selector loop. `answer(head)`
    turns a request's head into the whole HTTP response."""

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        selector: selectors.BaseSelector,
        answer: Callable[[bytes], bytes],
    ) -> None:
        self.sock, self.address = sock, address
        self._selector = selector
        self._answer = answer
        self._clients: dict[socket.socket, _Client] = {}
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def expire(self, now: float) -> None:
        """Drop the scrapers whose exchange has run past CLIENT_DEADLINE."""
        for client, state in list(self._clients.items()):
            if now > state.deadline:
                self._drop(client)

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.sock)
        self.sock.close()

    def _on_accept(self, _: Any) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = self.sock.accept()
            except OSError:  # none waiting, or no descriptor for it now: it waits
                return
            if len(self._clients) >= MAX_CLIENTS:
                self._drop(min(self._clients, key=lambda c: self._clients[c].deadline))
            client.setblocking(False)
            self._clients[client] = _Client(time.monotonic() + CLIENT_DEADLINE)
            self._selector.register(client, selectors.EVENT_READ, self._on_readable)

    def _on_readable(self, client: socket.socket) -> None:
        state = self._clients[client]
        try:
            data = client.recv(MAX_REQUEST - len(state.received))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # gone before its request was whole
            self._drop(client)
            return
        state.received += data
        end = state.received.find(b"\r\n\r\n")
        if end < 0 and len(state.received) < MAX_REQUEST:
            return  # the rest of the head is still coming
        head = bytes(state.received[: max(end, 0)])
        state.out = memoryview(self._answer(head))
        self._selector.modify(client, selectors.EVENT_WRITE, self._on_writable)
        self._on_writable(client)

    def _on_writable(self, client: socket.socket) -> None:
        state = self._clients[client]
        assert state.out is not None
        try:
            sent = client.send(state.out, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        state.out = state.out[sent:]
        if not state.out:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._clients.pop(client, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client)
        client.close()


# --- the master's metrics ------------------------------------------------------------------

FILE_INTERVAL = 5.0  # seconds between two writes of metrics_file
WORKER_STATES = (STARTING, IDLE, BUSY, RETIRING)
_ZEROS = [0] * slot.METRICS_WORDS


def worker_counts(journal: slot.Slot) -> list[int] | None:
    """What a worker counted in its journal's metrics area (slot.py), as a list of
    METRICS_WORDS ints (word 0 zeroed), or None when its journal has no area of this
    program's layout (a worker of an older program, kept across an upgrade)."""
    area = journal.metrics
    if area is None or area[0] != slot.METRICS_LAYOUT:
        return None
    values = area.tolist()
    values[0] = 0
    return values


class Metrics(Events):
    """The master's metrics: its Events, the request counts of exited workers (by
    export), the endpoint and the file. The master calls it at each event it counts,
    at each reap, every housekeeping round and at a reload; prometheus_client calls
    collect() at each scrape.

    `listener`: the endpoint's socket, bound by the command line before detaching."""

    def __init__(self, master: Master, listener: socket.socket | None = None) -> None:
        super().__init__()
        self._master = master
        self.exited: dict[str, list[int]] = {}  # export -> what its exited workers counted
        # Adopted workers (a dead master's): what they had counted before, not ours.
        self.baselines: dict[int, list[int]] = {}
        self.endpoint: Endpoint | None = None
        if listener is not None:
            self._serve(listener, master.config.metrics_listen or "")
        self._registries: tuple[Any, Any] | None = None  # (HTTP's, the file's)
        self._file_due = 0.0
        self._file_error: str | None = None

    # --- the master's calls ---

    def start(self) -> None:
        """The master runs: with metrics on, import prometheus_client now; say where the
        endpoint listens; after an upgrade whose configuration names another
        metrics_listen, move it there first (if that fails, it stays where it was: an
        upgrade cannot be refused any more)."""
        if metrics_on(self._master.config):
            self._registry(http=True)  # imports prometheus_client now, not at the first scrape
        wanted = self._master.config.metrics_listen
        if (self.endpoint.address if self.endpoint else None) != wanted:
            try:
                self.reconfigure(self._master.config)
            except ConfigError as e:
                self._master.log.error("metrics endpoint not moved", error=str(e))
        elif self.endpoint is not None:
            self._master.log.info("metrics listening", listen=self.endpoint.address)

    def reconfigure(self, new: Config) -> None:
        """Before a reload applies `new`: bind its metrics_listen if that changed. Raises
        ConfigError, having changed nothing, when the address cannot be bound (the
        reload is then refused). A metrics_file no longer configured is removed."""
        current = self.endpoint.address if self.endpoint else None
        if new.metrics_listen != current:
            sock = bind(new.metrics_listen) if new.metrics_listen else None
            if self.endpoint is not None:
                self.endpoint.close()
                self.endpoint = None
                self._master.log.info("metrics endpoint closed", listen=current)
            if sock is not None:
                self._serve(sock, new.metrics_listen or "")
                self._master.log.info("metrics listening", listen=new.metrics_listen)
        old_file = self._master.config.metrics_file
        if old_file is not None and old_file != new.metrics_file:
            with contextlib.suppress(OSError):
                os.unlink(old_file)
        self._file_due = 0.0

    def tick(self, now: float) -> None:
        """Housekeeping (monotonic `now`): drop late scrapers, write metrics_file when due."""
        if self.endpoint is not None:
            self.endpoint.expire(now)
        path = self._master.config.metrics_file
        if path is not None and now >= self._file_due:
            self._file_due = now + FILE_INTERVAL
            self.write_file(path)

    def worker_gone(self, w: Worker) -> None:
        """A worker was reaped: what it counted goes into its export's totals (call it
        before its journal is closed)."""
        values = self._counts(w)
        self.baselines.pop(w.pid, None)
        if values is not None:
            totals = self.exited.get(w.pool.name, _ZEROS)
            self.exited[w.pool.name] = list(map(operator.add, totals, values))

    def adopted(self, w: Worker) -> None:
        """A worker adopted from a master that died: what it had counted already was
        that master's (whose counters died with it), so it is not counted again."""
        if w.pid not in self.baselines:
            values = worker_counts(w.journal)
            if values is not None:
                self.baselines[w.pid] = values

    def close(self) -> None:
        """The daemon stops: close the endpoint and remove metrics_file (stale numbers
        would look live; node_exporter then shows the series gone)."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self._master.config.metrics_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._master.config.metrics_file)

    # --- an upgrade ---

    def state(self) -> dict[str, Any]:
        """What the next program needs to go on counting (proxyd/handover.py)."""
        return {
            "listen": self.endpoint.address if self.endpoint else None,
            "listen_fd": self.endpoint.sock.fileno() if self.endpoint else None,
            "events": [[*key, n] for key, n in self.counts.items()],
            "exited": self.exited,
            "baselines": {str(pid): values for pid, values in self.baselines.items()},
        }

    def restore(self, document: dict[str, Any] | None) -> None:
        """Take over state() of the program before (None: it had no metrics)."""
        if document is None:
            return
        for metric, export, value, n in document["events"]:
            self.counts[metric, export, value] = n
        for export, values in document["exited"].items():
            if len(values) == slot.METRICS_WORDS:  # else another layout's: not ours to add
                self.exited[export] = values
        for pid, values in document["baselines"].items():
            if len(values) == slot.METRICS_WORDS:
                self.baselines[int(pid)] = values
        if document["listen_fd"] is not None:
            sock = socket.socket(fileno=document["listen_fd"])
            sock.setblocking(False)
            self._serve(sock, document["listen"])

    # --- exposition ---

    def answer(self, head: bytes) -> bytes:
        """The HTTP response to a request whose head (request line and headers) is
        `head`: the metrics to `GET /metrics`, 404 to any other, 400 to no request."""
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return http_response("400 Bad Request", b"not an HTTP request\n", "text/plain")
        if parts[0] != b"GET" or parts[1].split(b"?")[0] != b"/metrics":
            return http_response("404 Not Found", b"proxyd serves GET /metrics\n", "text/plain")
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        try:
            body = generate_latest(self._registry(http=True))
        except Exception as e:  # a bug here must cost this scrape only, not the master
            self._master.log.exception("metrics request failed")
            return http_response("500 Internal Server Error", f"{e}\n".encode(), "text/plain")
        return http_response("200 OK", body, CONTENT_TYPE_LATEST)

    def write_file(self, path: str) -> None:
        """Write the metrics to `path` atomically (a temporary file renamed into place:
        prometheus_client.write_to_textfile), as node_exporter's textfile collector
        reads them. A failure is logged once until a write succeeds again."""
        from prometheus_client.exposition import write_to_textfile

        try:
            write_to_textfile(path, self._registry(http=False))
        except Exception as e:
            error = e.strerror if isinstance(e, OSError) and e.strerror else repr(e)
            if error != self._file_error:
                self._master.log.warning("metrics file not written", metrics_file=path, error=error)
            self._file_error = error
            return
        if self._file_error is not None:
            self._master.log.info("metrics file written again", metrics_file=path)
            self._file_error = None

    def collect(self) -> Iterator[Any]:
        """The metric families, from the master's state now (prometheus_client's
        Collector protocol; docs/metrics.md)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        master = self._master
        pools = list(master.pools.values())
        names = [pool.name for pool in pools]
        info = GaugeMetricFamily(
            "proxyd_build_info", "The running proxyd's version (always 1).", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "proxyd_start_time_seconds",
            "When this master started (Unix time; an upgrade keeps it, a restart does not).",
            value=master.started,
        )
        reloads = CounterMetricFamily(
            "proxyd_reloads", "Configuration reloads, done and refused.", labels=["result"]
        )
        reloads.add_metric(["done"], master.counters["reloads"])
        reloads.add_metric(["refused"], master.counters["reloads_refused"])
        yield reloads
        upgrades = CounterMetricFamily(
            "proxyd_upgrades", "Upgrades in place, done and refused.", labels=["result"]
        )
        upgrades.add_metric(["done"], master.upgrades)
        upgrades.add_metric(["refused"], master.counters["upgrades_refused"])
        yield upgrades
        dropped = log.dropped() + master.counters["log_lines_dropped_by_exited_workers"]
        dropped += sum(w.journal.fields[slot.LOG_DROPPED] for w in master.workers.values())
        yield CounterMetricFamily(
            "proxyd_log_lines_dropped",
            "Log lines dropped because the log did not take them (on_log_blocked = drop): "
            "the master's and every worker's, exited ones included.",
            value=dropped,
        )

        def per_export(kind: type, name: str, doc: str, value: Callable[[Any], float]) -> Any:
            family = kind(name, doc, labels=["export"])
            for pool in pools:
                family.add_metric([pool.name], value(pool))
            return family

        yield per_export(
            GaugeMetricFamily,
            "proxyd_export_available",
            "1 while the export can be served, 0 while its workers cannot start.",
            lambda pool: 0 if pool.unavailable else 1,
        )
        live = collections.Counter(c.export for c in master.connections.values())
        yield per_export(
            GaugeMetricFamily,
            "proxyd_connections",
            "Live connections (served, or waiting for a worker).",
            lambda pool: live[pool.name],
        )
        yield per_export(
            GaugeMetricFamily,
            "proxyd_connections_waiting",
            "Connections waiting for a worker.",
            lambda pool: len(pool.pending),
        )
        yield per_export(
            GaugeMetricFamily,
            "proxyd_pool_exhausted",
            "1 while connections wait and max_workers are running.",
            lambda pool: 1 if pool.is_exhausted() else 0,
        )
        yield per_export(
            GaugeMetricFamily,
            "proxyd_workers_max",
            "The export's max_workers.",
            lambda pool: pool.config.max_workers,
        )
        workers = GaugeMetricFamily(
            "proxyd_workers", "Workers by state.", labels=["export", "state"]
        )
        for pool in pools:
            states = collections.Counter(w.state for w in pool.workers.values())
            for state in WORKER_STATES:
                workers.add_metric([pool.name, state], states[state])
        yield workers
        for metric, (doc, label, values) in EVENTS.items():
            family = CounterMetricFamily(
                metric, doc, labels=["export", label] if label else ["export"]
            )
            for export in names:
                for value in values or ("",):
                    count = self.counts[metric, export, value]
                    family.add_metric([export, value] if label else [export], count)
            yield family

        totals = self._request_totals(names)
        requests = CounterMetricFamily(
            "proxyd_requests",
            "Requests answered by a worker, by request type and result (ok, or error: an "
            "errno reply).",
            labels=["export", "op", "result"],
        )
        durations = HistogramMetricFamily(
            "proxyd_request_duration_seconds",
            "Time from a request's start to its reply sent, in the worker (series appear "
            "with an op's first request).",
            labels=["export", "op"],
        )
        bounds = [floatToGoString(ns / 1e9) for ns in slot.DURATION_BOUNDS_NS] + ["+Inf"]
        for export in names:
            values = totals[export]
            for code, request in p.REQUESTS.items():
                at = slot.M_CODES + code * slot.PER_CODE
                requests.add_metric([export, request.name, "ok"], values[at + slot.M_OK])
                requests.add_metric([export, request.name, "error"], values[at + slot.M_ERROR])
                counts = values[at + slot.M_BUCKETS : at + slot.PER_CODE]
                if not any(counts):
                    continue
                cumulative, running = [], 0
                for bound, n in zip(bounds, counts, strict=True):
                    running += n
                    cumulative.append((bound, running))
                durations.add_metric(
                    [export, request.name], cumulative, values[at + slot.M_SUM_NS] / 1e9
                )
        yield requests
        yield durations
        errors = CounterMetricFamily(
            "proxyd_request_errors",
            "Error replies by errno (a fixed set of names, then other).",
            labels=["export", "errno"],
        )
        for export in names:
            values = totals[export]
            for i, name in enumerate((*slot.ERRNO_NAMES, "other")):
                errors.add_metric([export, name], values[slot.M_ERRNOS + i])
        yield errors

    # --- inside ---

    def _serve(self, sock: socket.socket, address: str) -> None:
        self.endpoint = Endpoint(sock, address, self._master.selector, self.answer)

    def _registry(self, http: bool) -> Any:
        """The registry of the endpoint (with the master's process metrics) or of the
        file (without: node_exporter has its own process_* metrics)."""
        if self._registries is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            for_http, for_file = CollectorRegistry(), CollectorRegistry()
            for registry in (for_http, for_file):
                registry.register(self)
            ProcessCollector(registry=for_http)
            self._registries = for_http, for_file
        return self._registries[0 if http else 1]

    def _counts(self, w: Worker) -> list[int] | None:
        values = worker_counts(w.journal)
        base = self.baselines.get(w.pid)
        if values is not None and base is not None:
            values = list(map(operator.sub, values, base))
        return values

    def _request_totals(self, exports: list[str]) -> dict[str, list[int]]:
        """Per export: what its exited workers counted plus what its live ones have."""
        totals = {name: list(self.exited.get(name, _ZEROS)) for name in exports}
        for w in self._master.workers.values():
            values = self._counts(w) if w.pool.name in totals else None
            if values is not None:
                totals[w.pool.name] = list(map(operator.add, totals[w.pool.name], values))
        return totals
