"""Prometheus metrics (issue 14): a real Prometheus scrapes a real proxyd while clients
run requests, a worker is killed and a peer refused, and the counters it stores move by
exactly what happened; the shipped scrape job, alert rules and dashboard work against
it; the endpoint is off by default, refuses a taken address (start and reload), costs a
slow scraper only its own time; the counts survive an upgrade; the text file; the
compiled and interpreted serving loops count alike."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import proxyd.ops
import proxyd.server
from proxyd import metrics, slot
from tests.daemon import (
    SYS_RECVFROM,
    SYS_TRUNCATE,
    Daemon,
    wait_in_syscall,
    wait_until,
    write_config,
)
from tests.proxyclient import (
    CHECKOUT,
    HEADER,
    OP_NAMES,
    TRUNCATE,
    ProxyClient,
    errno_of,
    marshal,
)
from tests.test_build import interpreted, serve_in_child

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
CONF = CHECKOUT / "conf"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/metrics", timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample proxyd exposes now: (name, labels) -> value."""
    status, body = http_get(port)
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


class Prometheus:
    """A real Prometheus (Debian's) on a loopback port, scraping proxyd at `target` every
    second with the shipped scrape job (conf/prometheus.yml) and alert rules, its
    storage in `tmp`."""

    def __init__(self, tmp: Path, target: str) -> None:
        tmp.mkdir()
        config = (CONF / "prometheus.yml").read_text()
        for text, replacement in (
            ('"127.0.0.1:9477"', f'"{target}"'),
            ("/etc/prometheus/proxyd-alerts.yml", str(CONF / "proxyd-alerts.yml")),
            ("scrape_interval: 15s", "scrape_interval: 1s"),
            ("evaluation_interval: 15s", "evaluation_interval: 1s"),
            ("scrape_timeout: 10s", "scrape_timeout: 1s"),
        ):
            assert text in config, text
            config = config.replace(text, replacement)
        (tmp / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
        )
        self.log_path = tmp / "prometheus.log"
        try:
            wait_until(lambda: self._ready(), timeout=60, what="prometheus ready")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        with contextlib.suppress(OSError):
            return http_get(self.port, "/-/ready", timeout=2)[0] == 200
        return False

    def api(self, path: str, **params: str) -> Any:
        url = f"/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(self.port, url)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (url, answer)
        return answer["data"]

    def query(self, expr: str) -> dict[frozenset, float]:
        """An instant query: each series' labels (but job and instance) -> its value."""
        result = {}
        for series in self.api("query", query=expr)["result"]:
            labels = {k: v for k, v in series["metric"].items() if k not in ("job", "instance")}
            result[frozenset(labels.items())] = float(series["value"][1])
        return result

    def scraped_since(self, when: float) -> bool:
        """Whether Prometheus has stored a scrape of proxyd taken after `when` (Unix time)."""
        found = self.query("timestamp(proxyd_build_info)")
        return bool(found) and min(found.values()) > when

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Tally:
    """What the clients saw: replies by (op, ok|error) and error replies by errno label."""

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.errnos: collections.Counter[str] = collections.Counter()

    def call(self, client: ProxyClient, op: str, *args: Any) -> Any:
        reply = getattr(client, op)(*args)
        if reply.fd is not None:
            os.close(reply.fd)
        err = errno_of(reply)
        self.requests[op, "error" if err else "ok"] += 1
        if err:
            name = errno.errorcode[err]
            self.errnos[name if name in slot.ERRNO_NAMES else "other"] += 1
        return reply


def test_prometheus_stores_exactly_what_the_clients_did(tmp_path: Path) -> None:
    port = free_port()
    exports = [{"name": "a"}, {"name": "locked", "allow_uids": [4242], "min_idle": 0}]
    with Daemon(tmp_path, exports, metrics_listen=f"127.0.0.1:{port}") as d:
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}")
        try:
            _exact_counts(d, prometheus, port)
        finally:
            prometheus.stop()


def series(name: str, **labels: str) -> frozenset:
    return frozenset({"__name__": name, **labels}.items())


def _exact_counts(d: Daemon, prometheus: Prometheus, port: int) -> None:
    up = 'up{job="proxyd"}'
    wait_until(lambda: prometheus.query(up) == {series("up"): 1.0}, 30, "proxyd scraped")
    counters = '{__name__=~"proxyd_.+_total"}'
    before = prometheus.query(counters)
    # Every counter exists from the start, at zero (an increase from its first scrape on
    # is then never lost).
    assert before[series("proxyd_requests_total", export="a", op="lstat", result="ok")] == 0
    assert not any(before.values()), {k: v for k, v in before.items() if v}

    tally = Tally()
    export = Path(d.exports["a"]["path"])
    (export / "file").write_text("data")
    c1 = d.connect("a")
    c2 = d.connect("a")
    conn1, conn2 = (e["conn"] for e in d.wait_event("connection accepted", count=2, export="a"))
    for _ in range(25):
        tally.call(c1, "lstat", "/file")
    for _ in range(4):
        tally.call(c1, "lstat", "/missing")  # ENOENT
    tally.call(c1, "mkdir", 0, 0, "/d", 0o755)
    for _ in range(2):
        tally.call(c2, "mkdir", 0, 0, "/d", 0o755)  # EEXIST
    for _ in range(3):
        tally.call(c2, "open", "/file", os.O_RDONLY)
    tally.call(c2, "open", "/missing", os.O_RDONLY)  # ENOENT
    tally.call(c2, "readlink", "/file", 64)  # EINVAL: not a symlink
    tally.call(c1, "chmod", "/file", 0o600)
    tally.call(c1, "remove", "/missing")  # ENOENT
    tally.call(c2, "lgetxattr", 64, "/file", "user.none")  # ENODATA
    tally.call(c2, "statfs", "/")

    # A worker killed between two requests: its guest notices nothing, and what it
    # counted stays counted.
    victim = d.serving_worker(conn1)
    wait_in_syscall(victim, SYS_RECVFROM)
    os.kill(victim, signal.SIGKILL)
    d.wait_event("crash recovery", outcome="nothing was in flight")
    tally.call(c1, "lstat", "/file")

    # A worker killed in a request that may have changed the export: the master answers
    # -EIO (a recovery, not a request any worker answered).
    leased = export / "leased"
    leased.write_text("data")
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease-break notice
    fd = os.open(leased, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)  # truncate() now blocks in the worker
        victim = d.serving_worker(conn2)
        c2.send_request(TRUNCATE, marshal("sq", "/leased", 0))
        wait_in_syscall(victim, SYS_TRUNCATE)
        os.kill(victim, signal.SIGKILL)
        assert errno_of(c2.recv_header_reply("status")) == errno.EIO
    finally:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, old)
    d.wait_event("crash recovery", outcome="answered EIO")
    tally.call(c2, "lstat", "/leased")

    # A peer the export does not allow.
    refused = socket.socket(socket.AF_UNIX)
    refused.connect(d.exports["locked"]["socket"])
    d.wait_event("connection refused", export="locked")
    refused.close()
    c1.close()
    c2.close()
    d.wait_event("connection closed", count=2, export="a")
    done = time.time()
    wait_until(lambda: prometheus.scraped_since(done), 30, "a scrape after the clients")

    expected = collections.Counter()
    for op in OP_NAMES:
        for result in ("ok", "error"):
            name = series("proxyd_requests_total", export="a", op=op, result=result)
            expected[name] = tally.requests[op, result]
    for name, n in tally.errnos.items():
        expected[series("proxyd_request_errors_total", export="a", errno=name)] = n
    expected[series("proxyd_worker_deaths_total", export="a", cause="SIGKILL")] = 2
    expected[series("proxyd_crash_recoveries_total", export="a", verdict="invisible")] = 1
    expected[series("proxyd_crash_recoveries_total", export="a", verdict="eio")] = 1
    expected[series("proxyd_connections_accepted_total", export="a")] = 2
    expected[series("proxyd_connections_closed_total", export="a", reason="eof")] = 2
    locked = series("proxyd_connections_refused_total", export="locked", reason="not_allowed")
    expected[locked] = 1
    after = prometheus.query(counters)
    assert set(after) == set(before)
    # Exactly these moved, by exactly that much; every other counter stayed at zero.
    assert {k: v for k, v in after.items() if v} == {k: float(v) for k, v in expected.items() if v}
    assert sum(tally.requests.values()) == 43 and tally.errnos["ENOENT"] == 6

    # The duration histogram counted every reply once, by request type.
    counts = prometheus.query('proxyd_request_duration_seconds_count{export="a"}')
    used = {op for op, _ in tally.requests}
    want = {
        series("proxyd_request_duration_seconds_count", export="a", op=op): float(
            tally.requests[op, "ok"] + tally.requests[op, "error"]
        )
        for op in used
    }
    assert counts == want
    slow = prometheus.query('proxyd_request_duration_seconds_bucket{export="a", le="30.0"}')
    assert sum(slow.values()) == sum(want.values())  # nothing took 30 s
    assert prometheus.query('proxyd_connections{export="a"}') == {
        series("proxyd_connections", export="a"): 0.0
    }

    # The shipped rules loaded and evaluate; the dashboard's every query runs.
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
    dashboard = json.loads((CONF / "grafana-proxyd.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 15
    for expr in exprs:
        for variable, text in (
            ("$instance", ".*"),
            ("$export", ".*"),
            ("$__rate_interval", "1m"),
        ):
            expr = expr.replace(variable, text)
        assert "$" not in expr, expr
        prometheus.query(expr)
    rate = 'sum by (export) (rate(proxyd_requests_total{instance=~".*", export=~".*"}[1m]))'
    assert prometheus.query(rate)[frozenset({"export": "a"}.items())] > 0

    # The exposition as promtool lints it: clean.
    status, body = http_get(port)
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True)
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint


# --- the counts across an upgrade, and the endpoint moved by it -----------------------------


def proxyd_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxyd", *args],
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
        timeout=120,
    )


def request_counts(samples: dict) -> dict[tuple[str, str], float]:
    counts = {}
    for (name, labels), v in samples.items():
        labels = dict(labels)
        if name == "proxyd_requests_total" and labels["export"] == "a":
            counts[labels["op"], labels["result"]] = v
    return counts


def test_counts_survive_an_upgrade_and_its_new_metrics_listen(tmp_path: Path) -> None:
    """No counter goes backwards across an upgrade: what the old program's workers
    counted (live, then exited under the new master) and what the master counted are
    handed over; a metrics_listen changed in the configuration moves the endpoint."""
    first, second = free_port(), free_port()
    control = str(tmp_path / "control.sock")
    daemon = {"metrics_listen": f"127.0.0.1:{first}", "control_socket": control}
    with Daemon(tmp_path, [{"name": "a"}], **daemon) as d:
        c = d.connect("a")
        for _ in range(10):
            assert c.lstat("/").ok
        assert not c.lstat("/missing").ok
        before = scrape(first)
        assert request_counts(before)["lstat", "ok"] == 10
        old_worker = d.serving_worker(d.events("connection accepted")[-1]["conn"])
        moved = {**daemon, "metrics_listen": f"127.0.0.1:{second}"}
        write_config(d.config, moved, [d.exports["a"]])
        done = proxyd_command("upgrade", "--socket", control)
        assert done.returncode == 0, done.stderr
        d.wait_event("upgrade done")
        d.wait_event("metrics listening", listen=f"127.0.0.1:{second}")
        after = scrape(second)
        for key, n in before.items():
            if key[0].endswith("_total") and key[0] != "process_cpu_seconds_total":
                assert after[key] >= n, key
        assert request_counts(after) == request_counts(before)
        with pytest.raises(OSError):
            http_get(first, timeout=2)  # the old address was let go
        # The old program's worker leaves at its next request boundary: what it counted
        # is folded into the export's totals by the new master.
        for _ in range(5):
            assert c.lstat("/").ok
        wait_until(lambda: old_worker not in d.workers(), what="the old worker replaced")
        for _ in range(5):
            assert c.lstat("/").ok
        c.close()
        d.wait_event("connection closed")
        last = scrape(second)
        assert request_counts(last)["lstat", "ok"] == 20
        assert request_counts(last)["lstat", "error"] == 1
        accepted = ("proxyd_connections_accepted_total", frozenset({"export": "a"}.items()))
        assert last[accepted] == 1


# --- off by default; a taken address; a configuration it refuses ---------------------------


def tcp_listening_inodes() -> set[str]:
    """Socket inodes of every TCP socket listening on this host (/proc/net/tcp, tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def journal_counts(pid: int) -> list[int]:
    """The metrics area of a worker's journal (slot.py), read through its memfd."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if not os.readlink(fd).startswith("/memfd:proxyd-journal"):
                continue
        with open(fd, "rb") as f:
            data = f.read()
        assert len(data) == slot.SLOT_SIZE
        words = memoryview(data[slot.SLOT_SIZE - slot.METRICS_WORDS * 8 :]).cast("Q")
        return words.tolist()
    raise AssertionError(f"worker {pid} holds no journal")


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_endpoint_off_by_default_and_workers_count_only_when_on(tmp_path: Path, on: bool) -> None:
    settings = {"metrics_listen": f"127.0.0.1:{free_port()}"} if on else {}
    with Daemon(tmp_path, [{"name": "a"}], **settings) as d:
        c = d.connect("a")
        for _ in range(7):
            assert c.lstat("/").ok
        worker = d.serving_worker(d.events("connection accepted")[-1]["conn"])
        wait_in_syscall(worker, SYS_RECVFROM)  # its last reply counted, if it counts
        counts = journal_counts(worker)
        listening = socket_inodes(d.proc.pid) & tcp_listening_inodes()
        c.close()
    lstat = slot.M_CODES + 8 * slot.PER_CODE  # LSTAT is request code 8
    buckets = counts[lstat + slot.M_BUCKETS : lstat + slot.PER_CODE]
    assert counts[0] == slot.METRICS_LAYOUT
    if on:
        assert len(listening) == 1
        assert counts[lstat + slot.M_OK] == 7 and sum(buckets) == 7
        assert sum(counts[1:]) == 7 + 7 + counts[lstat + slot.M_SUM_NS]  # nothing else
    else:
        assert not listening  # no TCP socket at all in the master
        assert not any(counts[1:])  # no store into the area: the counting is off


def test_a_taken_address_is_refused_at_start(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    (tmp_path / "a").mkdir()
    export = {"name": "a", "path": str(tmp_path / "a"), "socket": str(tmp_path / "a.sock")}
    config = write_config(tmp_path / "p.toml", {"metrics_listen": address}, [export])
    done = proxyd_command("-n", "--config", str(config))
    taken.close()
    assert done.returncode == 2
    assert (
        done.stderr == f"proxyd: error: daemon.metrics_listen: {address}: Address already in use\n"
    )
    assert not os.path.exists(export["socket"])  # nothing left behind


# What conf/proxyd.service's RestrictAddressFamilies=AF_UNIX does (a seccomp filter that
# refuses other socket families with EAFNOSUPPORT), here around the proxyd it execs.
UNIX_SOCKETS_ONLY = """
import errno, os, socket, sys
import pyseccomp
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
for family in (socket.AF_INET, socket.AF_INET6):
    rules.add_rule(
        pyseccomp.ERRNO(errno.EAFNOSUPPORT), "socket", pyseccomp.Arg(0, pyseccomp.EQ, family)
    )
rules.load()
os.execv(sys.executable, [sys.executable, "-m", "proxyd", *sys.argv[1:]])
"""


def test_a_service_without_network_is_told_so_at_start(tmp_path: Path) -> None:
    """Under conf/proxyd.service without the metrics drop-in (README, "Metrics") the
    endpoint's socket cannot even be made: one line naming the key, exit code 2."""
    (tmp_path / "a").mkdir()
    export = {"name": "a", "path": str(tmp_path / "a"), "socket": str(tmp_path / "a.sock")}
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "p.toml", {"metrics_listen": address}, [export])
    done = subprocess.run(
        [sys.executable, "-c", UNIX_SOCKETS_ONLY, "-n", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"proxyd: error: daemon.metrics_listen: {address}: Address family not supported by "
        "protocol\n"
    )
    assert not os.path.exists(export["socket"])  # nothing left behind


@pytest.mark.parametrize(
    ("daemon", "message"),
    [
        ({"metrics_listen": "localhost:9477"}, "daemon.metrics_listen: 'localhost:9477' is not"),
        ({"metrics_listen": "127.0.0.1"}, "daemon.metrics_listen: '127.0.0.1' is not HOST:PORT"),
        ({"metrics_listen": "127.0.0.1:99999"}, "the port must be a number from 1 to 65535"),
        ({"metrics_listen": "127.0.0.1:0"}, "the port must be a number from 1 to 65535"),
        ({"metrics_listen": "::1:9477"}, "write an IPv6 address in brackets"),
        ({"metrics_listen": 9477}, "daemon.metrics_listen: expected a string"),
        ({"metrics_file": "/nonexistent/proxyd.prom"}, "directory: No such file or directory"),
        ({"metrics_file": "/tmp/proxyd.txt"}, "the name must end in .prom"),
        ({"metrics_file": "/tmp/proxyd.prom"}, "other users than root may write in '/tmp'"),
    ],
)
def test_bad_metrics_settings_name_the_key(tmp_path: Path, daemon: dict, message: str) -> None:
    (tmp_path / "a").mkdir()
    export = {"name": "a", "path": str(tmp_path / "a"), "socket": str(tmp_path / "a.sock")}
    config = write_config(tmp_path / "p.toml", daemon, [export])
    done = proxyd_command("-n", "--config", str(config))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr, done.stderr


def test_a_reload_to_a_taken_address_is_refused_and_to_a_free_one_moves(tmp_path: Path) -> None:
    old, free = free_port(), free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = f"127.0.0.1:{taken.getsockname()[1]}"
    control = str(tmp_path / "control.sock")
    daemon = {"metrics_listen": f"127.0.0.1:{old}", "control_socket": control}
    try:
        with Daemon(tmp_path, [{"name": "a"}], **daemon) as d:
            exports = [d.exports["a"]]
            write_config(d.config, {**daemon, "metrics_listen": busy}, exports)
            done = proxyd_command("reload", "--socket", control)
            assert done.returncode == 1
            refusal = f"reload refused: daemon.metrics_listen: {busy}: Address already in use"
            assert refusal in done.stdout + done.stderr
            d.wait_event("reload refused")
            samples = scrape(old)  # still served where it was
            assert value(samples, "proxyd_reloads_total", result="refused") == 1
            write_config(d.config, {**daemon, "metrics_listen": f"127.0.0.1:{free}"}, exports)
            assert proxyd_command("reload", "--socket", control).returncode == 0
            assert value(scrape(free), "proxyd_reloads_total", result="done") == 1
            with pytest.raises(OSError):
                http_get(old, timeout=2)
            write_config(d.config, {"control_socket": control}, exports)  # metrics off
            assert proxyd_command("reload", "--socket", control).returncode == 0
            d.wait_event("metrics endpoint closed", listen=f"127.0.0.1:{free}")
            with pytest.raises(OSError):
                http_get(free, timeout=2)
    finally:
        taken.close()


# --- the text file ----------------------------------------------------------------------------


def file_samples(path: Path) -> dict[tuple[str, frozenset], float] | None:
    if not path.exists():
        return None
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def test_metrics_file_for_node_exporters_textfile_collector(tmp_path: Path) -> None:
    directory = tmp_path / "textfile"
    directory.mkdir(mode=0o755)
    path = directory / "proxyd.prom"
    with Daemon(tmp_path, [{"name": "a"}], metrics_file=str(path)) as d:
        c = d.connect("a")
        for _ in range(9):
            assert c.lstat("/").ok
        ok = {"export": "a", "op": "lstat", "result": "ok"}

        def counted() -> bool:
            samples = file_samples(path)
            return samples is not None and value(samples, "proxyd_requests_total", **ok) == 9

        wait_until(counted, timeout=30, what="the file counting 9 LSTATs")
        lint = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=path.read_bytes(), capture_output=True
        )
        assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint
        # node_exporter has process_* metrics of its own: none of the master's here.
        assert not [name for name, _ in file_samples(path) if name.startswith("process_")]
        assert os.listdir(directory) == ["proxyd.prom"]  # written by rename: no temporary left
        # A directory gone: one warning, and the file again once it is back.
        path.unlink()
        directory.rmdir()
        d.wait_event("metrics file not written", error="No such file or directory", timeout=30)
        directory.mkdir(mode=0o755)
        d.wait_event("metrics file written again", timeout=30)
        assert len(d.events("metrics file not written")) == 1
        assert path.exists()
        c.close()
    assert not path.exists()  # a stopped daemon's numbers would look live


# --- scrapers that do not behave ---------------------------------------------------------------


def at_eof(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` (without waiting)."""
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_slow_and_hostile_scrapers_cost_only_themselves(tmp_path: Path) -> None:
    port = free_port()
    with Daemon(tmp_path, [{"name": "a"}], metrics_listen=f"127.0.0.1:{port}") as d:
        silent = socket.create_connection(("127.0.0.1", port))  # never sends a byte
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never ends its head
        greedy = socket.socket()
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        greedy.connect(("127.0.0.1", port))
        greedy.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # never reads its answer
        c = d.connect("a")
        assert c.lstat("/").ok  # guests are served meanwhile
        status, body = http_get(port)  # and other scrapers, while those three still hang on
        assert status == 200 and b"proxyd_build_info" in body
        assert not at_eof(silent) and not at_eof(partial)
        assert http_get(port, "/")[0] == 404
        assert http_get(port, "/metrics/x")[0] == 404
        with socket.create_connection(("127.0.0.1", port)) as garbage:
            garbage.sendall(b"\x16\x03\x01 not http\r\n\r\n")  # a TLS hello, say
            assert garbage.recv(100).startswith(b"HTTP/1.1 400 ")
        # More scrapers at once than it serves: the ones that came first make room.
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_CLIENTS)]
        assert http_get(port)[0] == 200
        wait_until(lambda: at_eof(silent), timeout=10, what="the oldest scraper dropped")
        # Each has CLIENT_DEADLINE for its whole exchange, then is dropped.
        wait_until(lambda: all(at_eof(s) for s in flood), timeout=metrics.CLIENT_DEADLINE + 20)
        assert at_eof(partial)
        assert c.lstat("/").ok
        for s in [silent, partial, greedy, *flood]:
            s.close()
        c.close()


# --- one source, two runs: the serving loop interpreted counts as compiled ------------------------


def test_interpreted_loop_counts_as_the_compiled_one(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "file").write_bytes(b"data")
    (export / "link").symlink_to("file")
    areas = []
    for server_class in (proxyd.server.Server, interpreted(proxyd.server).Server):
        journal = slot.Slot()
        sock, pid = serve_in_child(server_class, export, journal, metrics=True)
        c = ProxyClient(sock)
        tally = Tally()
        for _ in range(5):
            tally.call(c, "lstat", "/file")
        tally.call(c, "lstat", "/missing")  # ENOENT
        tally.call(c, "readlink", "/link", 64)
        tally.call(c, "readlink", "/file", 64)  # EINVAL
        tally.call(c, "mkdir", 0, 0, "/link/d", 0o755)  # ENOTDIR... or EEXIST: whatever it is
        tally.call(c, "open", "/file", os.O_RDONLY)
        tally.call(c, "open", "/file", os.O_RDONLY | os.O_DIRECTORY)  # ENOTDIR
        tally.call(c, "lgetxattr", 8, "/file", "user.none")  # ENODATA
        c.send_raw(b"".join([marshal_request(8, "/file")] * 3))  # three in one write
        for _ in range(3):
            assert c.recv_header_reply("data").ok
        c.close()
        assert os.waitpid(pid, 0)[1] == 0
        values = journal.metrics.tolist()
        journal.close()
        codes = {op: code for code, op in enumerate(OP_NAMES, start=2)}
        for (op, result), n in tally.requests.items():
            at = slot.M_CODES + codes[op] * slot.PER_CODE
            extra = 3 if (op, result) == ("lstat", "ok") else 0
            assert values[at + (slot.M_OK if result == "ok" else slot.M_ERROR)] == n + extra
        for name, n in tally.errnos.items():
            assert values[slot.M_ERRNOS + (*slot.ERRNO_NAMES, "other").index(name)] == n
        areas.append(values)
    compiled, source = areas
    for code in range(slot.REQUEST_CODES):  # the same counts; durations differ, their count not
        at = slot.M_CODES + code * slot.PER_CODE
        for area in areas:
            buckets = area[at + slot.M_BUCKETS : at + slot.PER_CODE]
            assert sum(buckets) == area[at + slot.M_OK] + area[at + slot.M_ERROR]
            assert (area[at + slot.M_SUM_NS] > 0) == (sum(buckets) > 0)
        assert compiled[at : at + slot.M_SUM_NS] == source[at : at + slot.M_SUM_NS]
    assert compiled[slot.M_ERRNOS :] == source[slot.M_ERRNOS :]


def marshal_request(code: int, path: str) -> bytes:
    payload = marshal("s", path)
    return HEADER.pack(code, len(payload)) + payload


# --- the shipped Prometheus files; every label value accounted for --------------------------------


def test_shipped_rules_check_and_their_unit_tests_pass(tmp_path: Path) -> None:
    done = subprocess.run(
        [PROMTOOL, "check", "rules", CONF / "proxyd-alerts.yml"], capture_output=True
    )
    assert done.returncode == 0 and b"SUCCESS: 6 rules found" in done.stdout, done
    # Each alert fires when, and only when, it should (conf/proxyd-alerts.test.yml).
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "proxyd-alerts.test.yml"], cwd=CONF, capture_output=True
    )
    assert done.returncode == 0 and b"SUCCESS" in done.stdout, done
    config = (CONF / "prometheus.yml").read_text()
    config = config.replace("/etc/prometheus/proxyd-alerts.yml", str(CONF / "proxyd-alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(config)
    done = subprocess.run(
        [PROMTOOL, "check", "config", tmp_path / "prometheus.yml"], capture_output=True
    )
    assert done.returncode == 0, done


def test_every_outcome_and_closing_reason_has_its_label() -> None:
    """A recovery outcome or a closing reason the code can give maps to a label value of
    its own (never `closed` or `other` by accident)."""
    source = (CHECKOUT / "proxyd" / "recovery.py").read_text()
    outcomes = set(re.findall(r'Verdict\(\w+, "([^"]+)"', source))
    outcomes |= set(re.findall(r'outcome = "([^"]+)"', source))
    outcomes |= set(re.findall(r'self\._recovered\(conn, \w+, "([^"]+)"\)', source))
    assert len(outcomes) >= 7 and outcomes <= set(metrics.VERDICTS), outcomes - set(
        metrics.VERDICTS
    )
    reasons = set()
    for name in ("master.py", "recovery.py", "server.py"):
        text = (CHECKOUT / "proxyd" / name).read_text()
        reasons |= set(re.findall(r'_close(?:_connection)?\([^,()]+(?:\(\))?, "([^"]+)"\)', text))
        reasons |= set(re.findall(r'stats\.reason(?:, \w+\.\w+)? = f?"([^":{]+)', text))
    reasons.discard("released")  # a connection given back at a boundary: handed on, not closed
    assert len(reasons) >= 12 and reasons <= set(metrics.CLOSE_REASONS), reasons - set(
        metrics.CLOSE_REASONS
    )
