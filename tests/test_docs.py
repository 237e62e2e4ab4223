"""What the operator is told agrees with what ships and what runs (issue 18).

README's configuration table, conf/proxyd.toml and the configuration loader name the
same keys with the same defaults; README's `proxyd audit` examples are what `proxyd
audit` prints for a log a real daemon wrote; the Layout section lists every module;
no document links outside the repository; no table repeats a row; docs/protocol.md
agrees with proxyd/protocol.py and with the reference helper; and scripts/run, in a
fresh copy of the checkout, prints commands that do what they say.

Each check is a function returning the disagreements it finds, one line naming each;
the tests assert there are none, and feed the checks altered copies of the documents
to show that they fail when the documents and the code disagree.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxyd import config as loader
from proxyd import protocol
from proxyd.config import ConfigError
from tests.daemon import Daemon, wait_until
from tests.proxyclient import CHECKOUT, HEADER, ProxyClient, start_server

README = CHECKOUT / "README.md"
CONF = CHECKOUT / "conf" / "proxyd.toml"
PROTOCOL_DOC = CHECKOUT / "docs" / "protocol.md"

# --- markdown ------------------------------------------------------------------------------


def section(text: str, title: str) -> str:
    """The body of the section headed `title` (any level), up to the next heading of
    the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, re.M)
    assert match, f"no section {title!r}"
    level = len(match[1])
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of `text`: its body rows (header and rule left out), each a
    list of cells (`\\|` inside a cell is a literal bar)."""
    found: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
            continue
        if len(rows) > 2:
            found.append(rows[2:])
        rows = []
    return found


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)


# --- configuration: README's table, conf/proxyd.toml, the loader ---------------------------

REQUIRED = "required"
NOTHING = (None, ())  # what the loader holds for a key README calls "none"
# conf/proxyd.toml sets these to something else than the default, and says so.
CONF_SETS = {"control_socket": "the path proxyd status and the supervisorctl plugin use"}


def loader_keys() -> dict[str, set[str]]:
    return {"daemon": set(loader._DAEMON_KEYS), "export": set(loader._EXPORT_KEYS)}


class Loader:
    """What proxyd/config.py makes of a key: load_file on a minimal configuration (one
    export with its three required keys) plus that key."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "e").mkdir(exist_ok=True)
        self.minimal = {"name": '"e"', "path": f'"{tmp / "e"}"', "socket": f'"{tmp / "e.sock"}"'}

    def load(self, daemon: dict[str, str], export: dict[str, str]) -> loader.Config:
        lines = ["[daemon]", *(f"{k} = {v}" for k, v in daemon.items()), "[[export]]"]
        lines += [f"{k} = {v}" for k, v in export.items()]
        path = self.tmp / "probe.toml"
        path.write_text("\n".join(lines) + "\n")
        return loader.load_file(str(path))

    def value(self, where: str, key: str, toml: str | None = None) -> Any:
        """The loaded value of `key` set to the TOML text `toml`; its default if None."""
        daemon = {key: toml} if where == "daemon" and toml is not None else {}
        export = dict(self.minimal)
        if where == "export" and toml is not None:
            export[key] = toml
        loaded = self.load(daemon, export)
        return getattr(loaded if where == "daemon" else loaded.exports[0], key)

    def required(self, where: str, key: str) -> bool:
        if where != "export" or key not in self.minimal:
            return False
        export = {k: v for k, v in self.minimal.items() if k != key}
        try:
            self.load({}, export)
        except ConfigError as e:
            return f".{key}: missing" in str(e)
        return False


def readme_config(text: str) -> dict[tuple[str, str], str]:
    """README's configuration table: (section, key) -> its default cell."""
    rows = tables(section(text, "Configuration"))
    assert rows, "README's Configuration section has no table"
    found: dict[tuple[str, str], str] = {}
    where = "daemon"
    for cells in rows[0]:
        match = re.fullmatch(r"`(?:\[(\[?)(\w+)\]?\] )?(\w+)`", cells[0])
        assert match, f"README's configuration table: cannot read key cell {cells[0]!r}"
        if match[2]:
            where = match[2]
        found[(where, match[3])] = cells[1]
    return found


def readme_default(cell: str) -> tuple[str, str | None]:
    """("required" | "none" | "value", the TOML text of the value)."""
    if cell == REQUIRED:
        return REQUIRED, None
    if cell.split(" ")[0] == "none":
        return "none", None
    match = re.match(r"`([^`]+)`", cell)
    return ("value", match[1]) if match else ("unreadable", None)


def conf_keys(text: str) -> dict[tuple[str, str], str | None]:
    """conf/proxyd.toml: (section, key) -> the TOML text set, or None for a key shown
    only commented out (`# key = example`) in that section."""
    found: dict[tuple[str, str], str | None] = {}
    where = ""
    for line in text.splitlines():
        if line.strip() in ("[daemon]", "[[export]]"):
            where = line.strip("[] ")
        elif match := re.fullmatch(r"(\w+) = (.+)", line):
            found[(where, match[1])] = match[2]
        elif (match := re.fullmatch(r"# (\w+) = (.+)", line)) and (where, match[1]) not in found:
            found[(where, match[1])] = None
    return found


def config_disagreements(readme: str, conf: str, tmp: Path) -> list[str]:
    """Where README's table, conf/proxyd.toml and the loader disagree, one line each."""
    probe = Loader(tmp)
    known = {(where, key) for where, keys in loader_keys().items() for key in keys}
    documented, shown = readme_config(readme), conf_keys(conf)
    tomllib.loads(conf)  # the shipped file parses at all
    problems = [
        f"README documents [{w}] {k}, which the loader does not know"
        for w, k in sorted(documented.keys() - known)
    ]
    problems += [
        f"conf/proxyd.toml shows [{w}] {k}, which the loader does not know"
        for w, k in sorted(shown.keys() - known)
    ]
    for where, key in sorted(known):
        name = f"[{where}] {key}"
        required = probe.required(where, key)
        default = None if required else probe.value(where, key)
        said = "requires it" if required else f"defaults it to {default!r}"
        if (where, key) not in documented:
            problems.append(f"README's configuration table lacks {name}")
        else:
            cell = documented[(where, key)]
            kind, toml = readme_default(cell)
            if kind == "unreadable":
                problems.append(f"README: {name}: cannot read the default {cell!r}")
            elif required != (kind == REQUIRED) or (kind == "none" and default not in NOTHING):
                problems.append(f"README: {name} is {cell!r}, the loader {said}")
            elif kind == "value" and probe.value(where, key, toml) != default:
                problems.append(f"README: {name} defaults to {toml}, the loader to {default!r}")
        if (where, key) not in shown:
            problems.append(f"conf/proxyd.toml does not show {name}")
            continue
        toml = shown[(where, key)]
        if toml is None and default not in NOTHING:
            problems.append(f"conf/proxyd.toml shows {name} commented out, the loader {said}")
        elif toml is None or required or key in CONF_SETS:
            continue
        elif probe.value(where, key, toml) != default:
            problems.append(f"conf/proxyd.toml sets {name} = {toml}, the loader {said}")
    return problems


def test_readme_conf_and_loader_agree_on_keys_and_defaults(tmp_path: Path) -> None:
    problems = config_disagreements(README.read_text(), CONF.read_text(), tmp_path)
    assert not problems, "\n".join(problems)


def test_the_configuration_check_names_each_disagreement(tmp_path: Path) -> None:
    """The check above can fail: a row dropped, a default changed, a key unknown, a key
    missing from conf/proxyd.toml or set there to another value are each named."""
    readme, conf = README.read_text(), CONF.read_text()
    assert '| `seccomp` | `"kill"` |' in readme and "\nmin_idle = 1\n" in conf
    altered_readme = (
        re.sub(r"^\| `seccomp` .*\n", "", readme, flags=re.M)
        .replace("| `stop_timeout` | `5.0` |", "| `stop_timeout` | `10.0` |")
        .replace("| `readonly` | `false` |", "| `readonly` | `false` |\n| `ids_map` | `[]` | x |")
    )
    altered_conf = conf.replace("\nmin_idle = 1\n", "\nmin_idle = 2\n").replace(
        "\nseccomp = ", "\n# seccomp = "
    )
    problems = config_disagreements(altered_readme, altered_conf, tmp_path)
    expected = [
        "README's configuration table lacks [daemon] seccomp",
        "README: [daemon] stop_timeout defaults to 10.0, the loader to 5.0",
        "README documents [export] ids_map, which the loader does not know",
        "conf/proxyd.toml sets [export] min_idle = 2, the loader defaults it to 1",
        "conf/proxyd.toml shows [daemon] seccomp commented out, the loader defaults it to 'kill'",
    ]
    for line in expected:
        assert line in problems, problems
    assert len(problems) == len(expected), problems


# --- layout, links, tables --------------------------------------------------------------------


def layout_disagreements(readme: str, checkout: Path) -> list[str]:
    """proxyd/ modules (*.py, *.pxd) the Layout section does not list, and files it
    lists that do not exist."""
    blocks = code_blocks(section(readme, "Layout"))
    listed = {m for block in blocks for m in re.findall(r"^(\S+)\s", block, re.M)}
    modules = {str(p.relative_to(checkout)) for p in (checkout / "proxyd").glob("*.p[yx]*")}
    modules = {m for m in modules if m.endswith((".py", ".pxd"))}
    problems = [f"Layout does not list {m}" for m in sorted(modules - listed)]
    problems += [
        f"Layout lists {m}, which does not exist"
        for m in sorted(listed)
        if not (checkout / m).exists()
    ]
    return problems


def test_layout_lists_every_module() -> None:
    problems = layout_disagreements(README.read_text(), CHECKOUT)
    assert not problems, "\n".join(problems)
    missing = README.read_text().replace("proxyd/title.py ", "proxyd/titles.py ")
    assert layout_disagreements(missing, CHECKOUT) == [
        "Layout does not list proxyd/title.py",
        "Layout lists proxyd/titles.py, which does not exist",
    ]


def documents() -> list[Path]:
    return [README, *sorted((CHECKOUT / "docs").glob("*.md"))]


def link_problems(path: Path, text: str) -> list[str]:
    """Links that leave the repository or lead nowhere: every markdown link that is not
    a URL must name a file of the checkout (and a heading of it, after a #), and no
    text may name a document outside the checkout (`../*.md`, /work/)."""
    problems = []
    name = path.relative_to(CHECKOUT)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if CHECKOUT not in resolved.parents or not resolved.is_file():
            problems.append(f"{name} links to {target}, not a file of the repository")
        elif anchor and anchor not in headings(resolved.read_text()):
            problems.append(f"{name} links to {target}: {resolved.name} has no such heading")
    # A document named in the text (not linked) that lies outside the checkout.
    for match in re.finditer(r"(?<![\w.])(\.\./[\w./-]+\.md|/work/[\w./-]+)", text):
        problems.append(f"{name} names {match[1]}, outside the repository")
    return problems


def headings(text: str) -> set[str]:
    """GitHub's anchors of a document's headings."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }


def test_documents_link_only_inside_the_repository() -> None:
    problems = [p for doc in documents() for p in link_problems(doc, doc.read_text())]
    assert not problems, "\n".join(problems)
    assert "[docs/protocol.md](docs/protocol.md)" in README.read_text()
    outside = "See [the contract](../shared/docs/protocol.md) and [x](docs/events.md#nope)."
    assert link_problems(README, outside) == [
        "README.md links to ../shared/docs/protocol.md, not a file of the repository",
        "README.md links to docs/events.md#nope: events.md has no such heading",
        "README.md names ../shared/docs/protocol.md, outside the repository",
    ]


def repeated_rows(text: str) -> list[str]:
    """Table rows saying the same thing twice: a first cell equal to another's, or
    another's followed by more words (one state split over two rows)."""
    problems = []
    for table in tables(text):
        firsts = [row[0] for row in table]
        for i, a in enumerate(firsts):
            for b in firsts[i + 1 :]:
                if a == b or b.startswith(a + ",") or a.startswith(b + ","):
                    problems.append(f"{a!r} / {b!r}")
    return problems


def test_no_table_repeats_a_row() -> None:
    problems = [p for doc in documents() for p in repeated_rows(doc.read_text())]
    assert not problems, "\n".join(problems)
    dies = section(README.read_text(), "When a worker dies")
    assert repeated_rows(dies) == []
    twice = dies.replace("| sending a reply |", "| sending a reply |", 1) + (
        "\n| the worker was | the guest gets | then |\n|---|---|---|\n"
        "| sending a reply | x | y |\n| sending a reply, and the guest sends nothing | x | y |\n"
    )
    assert repeated_rows(twice) == [
        "'sending a reply' / 'sending a reply, and the guest sends nothing'"
    ]


# --- README's proxyd audit examples, run against a real daemon's log ------------------------

LOG_ARG = "/var/log/proxyd/proxyd.log*"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
# JSON fields that differ from run to run: when, which process, which worker, how long.
VOLATILE = {"timestamp", "pid", "peer_pid", "worker", "dur_us"}
UID = 1000  # the peer uid of the examples' client (QEMU runs as a user of its own)


def connect_as(path: str, uid: int) -> ProxyClient:
    """Connect to `path` as QEMU would, from a process of uid (and gid) `uid`: SO_PEERCRED
    records the connecting process's ids. The connect is made by a child that switches
    its effective ids (keeping root's file-system ids, so that it may reach the test's
    root-only directories), and the connected socket is used here."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (a child)
        code = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            os.setresgid(uid, uid, 0)
            os.setresuid(uid, uid, 0)
            libc.setfsuid(0)
            libc.setfsgid(0)
            sock.connect(path)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"connect to {path} as uid {uid} failed"
    os.unlink(path)  # as QEMU does after connecting
    return ProxyClient(sock)


def produce_audit_log(tmp: Path) -> Path:
    """A real daemon serving two exports to a client of uid 1000 (three connections,
    one after the other, each awaited in the log): the log README's examples query."""
    with Daemon(tmp, [{"name": "vm1"}, {"name": "vm2"}]) as d:
        vm1, vm2 = (Path(d.exports[name]["path"]) for name in ("vm1", "vm2"))
        (vm1 / "home" / "alice").mkdir(parents=True)
        (vm1 / "home" / "alice" / "old").write_text("")
        os.mkfifo(vm1 / "home" / "alice" / "fifo")
        for name in ("notes.txt", "old", "a"):
            (vm2 / name).write_text("")
        (vm2 / "link").symlink_to("notes.txt")
        done = {"ops": 0, "connections": 0}

        def served(client: ProxyClient, requests: list[tuple[str, tuple]]) -> None:
            for name, args in requests:
                getattr(client, name)(*args)
            client.close()
            done["ops"] += len(requests)
            done["connections"] += 1
            d.wait_event("op", count=done["ops"])
            d.wait_event("connection closed", count=done["connections"])

        home = "//home/alice"
        served(
            connect_as(d.exports["vm1"]["socket"], UID),
            [
                ("mkdir", (UID, UID, f"{home}/src", 0o755)),
                (
                    "create",
                    (f"{home}/src/main.c", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, UID, UID),
                ),
                ("remove", (f"{home}/old.txt",)),
            ],
        )
        served(
            connect_as(d.exports["vm1"]["socket"], UID),
            [
                ("symlink", (UID, UID, "../target", f"{home}/link")),
                ("open", (f"{home}/fifo", os.O_WRONLY)),
                ("mkdir", (UID, UID, f"{home}/a -> b", 0o755)),
            ],
        )
        served(
            connect_as(d.exports["vm2"]["socket"], UID),
            [
                ("chmod", ("//notes.txt", 0o600)),
                ("lsetxattr", ("//link", "user.tag", b"x", 1, 0)),
                ("remove", ("//old",)),
                ("rename", ("//a", "//b")),
            ],
        )
    return d.stderr_path


def readme_audit_examples(text: str) -> list[tuple[str, list[str]]]:
    """Every `$ proxyd audit ...` of README with the lines shown under it."""
    examples: list[tuple[str, list[str]]] = []
    for block in code_blocks(section(text, "Logs and the audit trail")):
        for line in block.splitlines():
            if line.startswith("$ proxyd audit "):
                examples.append((line[2:], []))
            elif examples and block.startswith("$ "):
                examples[-1][1].append(line)
    return [(command, strip_blank(lines)) for command, lines in examples]


def strip_blank(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def run_example(command: str, log: Path) -> list[str]:
    """The command's output as a terminal shows it: stdout, then stderr (proxyd audit
    writes its stderr line after the output)."""
    args = [str(log) if a == LOG_ARG else a for a in shlex.split(command)[2:]]
    done = subprocess.run(
        [sys.executable, "-m", "proxyd", "audit", *args],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done
    return strip_blank((done.stdout + done.stderr).splitlines())


def comparable(line: str) -> Any:
    """What is compared of an output line: a JSON line's keys in order and its values
    but VOLATILE ones; any other line's whitespace-separated words (column widths vary
    with the values), each timestamp replaced by TIME and a table row's last word (its
    DUR_US) by N."""
    if line.startswith("{"):
        event = json.loads(line)
        return list(event), {k: v for k, v in event.items() if k not in VOLATILE}
    words = TIMESTAMP.sub("TIME", line).split()
    if words and words[0] == "TIME" and words[-1].isdigit():
        words[-1] = "N"
    return words


def example_disagreements(text: str, log: Path) -> list[str]:
    problems = []
    examples = readme_audit_examples(text)
    if not examples:
        return ["README shows no proxyd audit example"]
    for command, shown in examples:
        printed = run_example(command, log)
        if [comparable(x) for x in shown] != [comparable(x) for x in printed]:
            problems.append(
                f"README's `{command}` shows\n  "
                + "\n  ".join(shown)
                + "\nbut it prints\n  "
                + "\n  ".join(printed)
            )
    return problems


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return produce_audit_log(tmp_path_factory.mktemp("audit"))


def test_readme_audit_examples_are_what_proxyd_audit_prints(audit_log: Path) -> None:
    """Each example is run as README shows it, its log argument replaced by the log a
    real daemon wrote (produce_audit_log), and must print the lines README shows:
    compared as `comparable` says (timestamps, pids, worker indexes and durations
    excepted)."""
    readme = README.read_text()
    problems = example_disagreements(readme, audit_log)
    assert not problems, "\n".join(problems)
    commands = [command for command, _ in readme_audit_examples(readme)]
    assert any("--format json" in c for c in commands) and any("summary" in c for c in commands)
    # And the check can fail: one row less, one path changed.
    altered = readme.replace("remove   //home/alice/old.txt", "remove   //home/alice/new.txt", 1)
    assert altered != readme and len(example_disagreements(altered, audit_log)) == 1


def test_the_op_line_examples_have_the_keys_of_a_real_one(audit_log: Path) -> None:
    """README's and docs/events.md's sample `op` line: the keys, in the order, of a real
    CREATE's line."""
    real = next(
        json.loads(line) for line in audit_log.read_text().splitlines() if '"op":"create"' in line
    )
    for doc in (README, CHECKOUT / "docs" / "events.md"):
        samples = [
            json.loads(line)
            for block in code_blocks(doc.read_text())
            for line in block.splitlines()
            if line.startswith('{"pid"') and '"op":"create"' in line
        ]
        assert samples, f"{doc.name} shows no sample op line"
        for sample in samples:
            assert list(sample) == list(real), (doc.name, list(sample), list(real))


# --- docs/protocol.md against proxyd/protocol.py and the reference helper -------------------


def documented_requests(text: str) -> dict[int, tuple[str, str]]:
    """docs/protocol.md's request table: code -> (name, reply kind)."""
    found = {}
    for table in tables(text):
        for cells in table:
            if cells[0].isdigit() and len(cells) >= 4:
                kind = re.match(r"(fd|status|data)", cells[-1].replace("size 0: ", ""))
                found[int(cells[0])] = (cells[1].lower(), kind[1] if kind else cells[-1])
    return found


def test_protocol_doc_requests_match_the_decoders() -> None:
    doc = documented_requests(PROTOCOL_DOC.read_text())
    code = {c: (r.name, r.reply) for c, r in protocol.REQUESTS.items()}
    # LGETXATTR and LLISTXATTR: a status reply for size 0, else a data reply.
    code[protocol.T_LGETXATTR] = ("lgetxattr", "status")
    code[protocol.T_LLISTXATTR] = ("llistxattr", "status")
    assert doc == code


def test_protocol_doc_record_sizes_are_the_reference_helpers(tmp_path: Path) -> None:
    """The LSTAT and STATFS record sizes docs/protocol.md states are those of the
    reference helper's replies (and proxyd's), for a path sent with its terminator as
    QEMU sends the paths it looks up."""
    text = PROTOCOL_DOC.read_text()
    stat_size = int(re.search(r"LSTAT record is (\d+) bytes", text)[1])
    statfs_size = int(re.search(r"STATFS record is (\d+) bytes", text)[1])
    export = tmp_path / "export"
    export.mkdir()
    for kind in ("reference", "proxyd"):
        with start_server(kind, export) as server:
            client = server.client
            for code, path, size in (
                (protocol.T_LSTAT, b"/\0", stat_size),
                (protocol.T_STATFS, b"//\0", statfs_size),
            ):
                client.send_request(code, len(path).to_bytes(2, sys.byteorder) + path)
                assert HEADER.unpack(client._recv_exact(HEADER.size)) == (0, size), kind
                client._recv_exact(size)


# --- the README walk-through: scripts/run in a fresh copy, then the commands it prints ------


def test_scripts_run_prints_commands_that_say_what_happened(tmp_path: Path) -> None:
    """As a new administrator: scripts/run in a clean copy of the checkout, then every
    command it prints. The status commands answer; the reload command of a broken
    configuration exits 1 with proxyd's own verdict (not `signalled`), of a good one
    says it was applied; the audit command reads the log; the stop command stops
    supervisord and proxyd."""
    from tests.test_run_script import clean_copy, run
    from tests.test_supervisor import mentioning

    copy = clean_copy(tmp_path / "co")
    config = copy / "var" / "run" / "proxyd.toml"
    pidfile = copy / "var" / "run" / "supervisord.pid"
    try:
        first = run(copy)
        assert first.returncode == 0, first
        out = first.stdout

        def command(label: str) -> subprocess.CompletedProcess:
            """The command printed after `label:` (before a two-space comment), pasted
            into a shell as an administrator would."""
            line = re.search(rf"^{label}:\s+(.*?)(\s{{2,}}\(.*)?$", out, re.M)
            assert line, out
            return subprocess.run(
                ["bash", "-c", line[1]], capture_output=True, text=True, timeout=60
            )

        assert re.search(r"proxyd\s+RUNNING", command("Status").stdout)
        workers = command("Workers")
        assert workers.returncode == 0 and re.search(r"^share#0\s", workers.stdout, re.M), workers
        also = re.search(r"^Workers:.*\(or: (.*)\)$", out, re.M)
        assert also, out
        direct = subprocess.run(shlex.split(also[1]), capture_output=True, text=True, timeout=60)
        assert direct.returncode == 0 and re.search(r"^share#0\s", direct.stdout, re.M), direct

        good = config.read_text()
        config.write_text(good.replace("min_idle = 1", "min_idle = 99"))
        refused = command("Reload")
        assert refused.returncode != 0, refused
        assert "reload refused: export 'share'.min_idle: 99 is more than max_workers 16" in (
            refused.stdout + refused.stderr
        ), refused
        config.write_text(good)
        applied = command("Reload")
        assert applied.returncode == 0, applied
        assert "reload applied (generation 1)" in applied.stdout, applied
        audit = command("Audit")
        assert audit.returncode == 0 and "reload refused" in audit.stdout, audit

        supervisord = int(pidfile.read_text())
        assert command("Stop").returncode == 0
        wait_until(lambda: not os.path.exists(f"/proc/{supervisord}"), 30, "supervisord gone")
    finally:
        if pidfile.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not mentioning(f"{copy}/var/run/"), 30, "daemons gone")
        for pid in mentioning(str(copy)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
