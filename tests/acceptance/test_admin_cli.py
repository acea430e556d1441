"""scire-admin as an operator meets it: tables and JSON, exit codes, job watch,
errors in words (TLS, usage, disks), help with examples, completion, man pages.

Everything runs the installed binaries against a real server (``running``)."""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import http.server
import ipaddress
import json
import os
import pty
import re
import socket
import ssl
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Deployment, _exe, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from scire_schema import certs, protocol, tls
from scire_schema.exitcodes import ExitCode
from scire_server import admin_cli, ca

REPO = Path(__file__).resolve().parents[2]


def admin_text(
    dep: Deployment, *args: str, bundle: Path | None = None, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    """scire-admin without --json: what an operator reads."""
    return subprocess.run(
        [
            _exe("scire-admin"),
            "--server",
            url or dep.url,
            "--bundle",
            str(bundle or dep.bundle),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=dep.root,
    )


def header(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[0].split()


@pytest.fixture
def fleet(running: Deployment) -> Deployment:
    """host1 and host2 enrolled, both in group web; alice may run on host1 only."""
    dep = running
    dep.enroll("host1")
    dep.enroll("host2")
    dep.admin("group", "create", "web")
    dep.admin("group", "add", "web", "host1", "host2")
    dep.add_user("alice")
    dep.admin("grant", "add", "alice", "run", "host1")
    return dep


# --- tables and JSON ---------------------------------------------------------------


def test_every_listing_as_a_table_and_as_json(fleet: Deployment) -> None:
    dep = fleet
    job_id = dep.submit("--command", "echo hello", "--group", "@web")
    dep.run_agent("host1")
    dep.run_agent("host2")
    tables = {
        ("client", "list"): ["NAME", "STATUS", "ACTIVE_JOBS", "LAST_SEEN_AT", "REGISTERED_AT"],
        ("group", "list"): ["NAME", "MEMBERS"],
        ("user", "list"): ["NAME", "IS_ADMIN", "STATUS", "GROUPS", "CREATED_AT"],
        ("grant", "list"): ["ID", "SUBJECT", "PRIVILEGE", "TARGET", "CREATED_BY"],
        ("job", "list"): ["ID", "NAME", "OWNER", "PRIORITY", "STATE", "STATES", "CREATED_AT"],
        ("audit", "--job", str(job_id)): ["AT", "ACTOR", "ACTION", "JOB_ID", "CLIENT"],
        ("server", "list"): [
            "INSTANCE_KEY",
            "HOSTNAME",
            "PID",
            "STATE",
            "HEARTBEAT_AT",
            "HEARTBEAT_AGE",
            "URL",
        ],
    }
    for args, columns in tables.items():
        assert header(admin_text(dep, *args))[: len(columns)] == columns, args
        assert isinstance(dep.admin(*args), list), args
    assert {c["name"] for c in dep.admin("client", "list")} == {"host1", "host2"}
    assert dep.admin("group", "list") == [{"name": "web", "members": ["host1", "host2"]}]

    show = admin_text(dep, "job", "show", str(job_id))
    assert show.stdout.startswith(f"job {job_id} (command) by admin: succeeded")
    assert "--- output of host1 ---\nhello" in show.stdout
    assert dep.job(job_id)["assignments"][0]["output"] == "hello\n"
    client = admin_text(dep, "client", "show", "host1")
    assert "name: host1" in client.stdout and "recent jobs:" in client.stdout
    assert dep.admin("client", "show", "host1")["name"] == "host1"
    assert "token:" in admin_text(dep, "client", "token").stdout
    assert len(dep.admin("client", "token", "--uses", "2")["token"]) == 48
    cancel = dep.admin("job", "cancel", str(job_id))
    assert cancel == {"job_id": job_id, "cancelled": 0}


def test_client_list_and_show_give_the_certificate_expiry(fleet: Deployment) -> None:
    dep = fleet
    cert = certs.load_cert((dep.agent_dir("host1") / "cert.pem").read_bytes())
    ends = cert.not_valid_after_utc
    listed = {c["name"]: c for c in dep.admin("client", "list")}
    assert protocol.parse_time(listed["host1"]["cert_not_after"]) == ends.replace(tzinfo=None)
    assert (
        dep.admin("client", "show", "host1")["cert_not_after"] == listed["host1"]["cert_not_after"]
    )
    text = admin_text(dep, "client", "list")
    assert "CERT_EXPIRES" in header(text)
    row = next(line for line in text.stdout.splitlines() if line.startswith("host1 "))
    assert f"{ends:%Y-%m-%d}" in row
    assert "expires in" not in row  # a fresh certificate is years away
    assert f"cert_expires: {ends:%Y-%m-%d}" in admin_text(dep, "client", "show", "host1").stdout


def test_a_certificate_near_its_end_is_flagged() -> None:
    now = dt.datetime(2026, 11, 23, 12, 0, 0)
    assert admin_cli.cert_expiry(None, now) is None
    assert admin_cli.cert_expiry("2027-06-01T00:00:00Z", now) == "2027-06-01"
    assert admin_cli.cert_expiry("2026-12-20T00:00:00Z", now) == (
        "2026-12-20 (expires in < 30 days)"
    )
    assert admin_cli.cert_expiry("2026-11-01T00:00:00Z", now) == "2026-11-01 (EXPIRED)"


def test_job_list_pages_past_the_newest(fleet: Deployment) -> None:
    dep = fleet
    jobs = [dep.submit("--command", "true", "--host", "host1") for _ in range(5)]
    page = admin_text(dep, "job", "list", "--limit", "2")
    assert [int(line.split()[0]) for line in page.stdout.splitlines()[1:]] == jobs[3:]
    assert f"scire-admin job list --before {jobs[3]}" in page.stderr
    older = dep.admin("job", "list", "--limit", "2", "--before", str(jobs[3]))
    assert [j["id"] for j in older] == jobs[1:3]
    assert [j["id"] for j in dep.admin("job", "list", "--all")] == jobs


def test_submit_many_checks_every_line_first_and_submits_once(fleet: Deployment) -> None:
    dep = fleet
    jobs = dep.root / "jobs.jsonl"
    bad = [
        json.dumps({"hosts": ["host1"], "command": "true"}),
        json.dumps({"hosts": ["host1"], "comand": "true"}),
    ]
    jobs.write_text("\n".join(bad) + "\n")
    refused = admin_text(dep, "job", "submit-many", str(jobs))
    assert refused.returncode == ExitCode.USAGE
    assert "line 2: unknown key(s) comand" in refused.stderr
    assert dep.admin("job", "list") == []  # nothing was sent

    good = [
        json.dumps({"hosts": ["host1"], "command": "echo one", "name": "one"}),
        "",
        json.dumps({"groups": ["@web"], "script": "#!/bin/sh\necho two\n"}),
        json.dumps({"hosts": ["host1", "nosuch"], "command": "true"}),
    ]
    jobs.write_text("\n".join(good) + "\n")
    first = admin_text(dep, "job", "submit-many", str(jobs))
    # Line 4 is refused as a whole (no such client); the others are submitted.
    assert first.returncode == ExitCode.ERROR, first.stderr
    assert "line 4: no client nosuch" in first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("line 1: job ") and lines[0].endswith("submitted for host1")
    assert lines[1].startswith("line 3: job ") and lines[1].endswith("for host1, host2")
    # The same file again: the same request keys, so the same jobs and no new ones.
    again = dep.admin_run("job", "submit-many", str(jobs))
    answers = [json.loads(line) for line in again.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 3]
    assert all(a["repeated"] for a in answers)
    assert len(dep.admin("job", "list")) == 2


def test_the_commands_that_call_the_server_load_no_database_layer() -> None:
    probe = (
        "import sys; from scire_server import admin_cli; "
        "admin_cli.build_parser().parse_args(['job', 'list']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic') "
        "or m.startswith('scire_server.store') or m == 'scire_server.models'))"
    )
    proc = subprocess.run(
        [str(Path(_exe("scire-admin")).parent / "python"), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_user_sees_their_own_grants(fleet: Deployment) -> None:
    dep = fleet
    alice = dep.root / "alice.pem"
    dep.admin("group", "create", "--user", "ops")
    dep.admin("group", "add", "--user", "ops", "alice")
    dep.admin("grant", "add", "@ops", "run", "host2")
    dep.add_user("bob")
    dep.admin("grant", "add", "bob", "run", "host2")
    mine = dep.admin("grant", "list", bundle=alice)
    assert {(g["subject"], g["target"]) for g in mine} == {("alice", "host1"), ("@ops", "host2")}
    assert len(dep.admin("grant", "list")) == 3


# --- exit codes --------------------------------------------------------------------------


def test_exit_codes_of_a_job_where_one_host_fails(fleet: Deployment, tmp_path: Path) -> None:
    dep = fleet
    marker = tmp_path / "host2-fails"
    job_id = dep.submit("--command", f"test ! -e {marker}", "--host", "host1", "--host", "host2")
    dep.run_agent("host1")
    marker.write_text("")
    dep.run_agent("host2")

    wait = dep.admin_run("job", "wait", str(job_id), "--timeout", "30")
    assert wait.returncode == ExitCode.HOSTS_FAILED, wait.stderr
    assert "1 of 2 host(s) did not succeed: host2" in wait.stderr
    assert {a["client"]: a["state"] for a in json.loads(wait.stdout)["assignments"]} == {
        "host1": "succeeded",
        "host2": "failed",
    }
    watch = admin_text(dep, "job", "watch", str(job_id))
    assert watch.returncode == ExitCode.HOSTS_FAILED, watch.stderr
    assert f"job {job_id}: 2/2 final" in watch.stdout
    assert "succeeded 1, failed 1, denied 0" in watch.stdout

    ok = dep.submit("--command", "true", "--host", "host1")
    dep.run_agent("host1")
    assert dep.admin_run("job", "wait", str(ok)).returncode == ExitCode.OK


def test_exit_codes_of_refusals_and_failures(fleet: Deployment) -> None:
    dep = fleet
    alice = dep.root / "alice.pem"
    # alice may run on host1, not host2: the job is made, the refusal is told.
    proc = admin_text(dep, "job", "submit", "--command", "true", "--group", "web", bundle=alice)
    assert proc.returncode == ExitCode.TARGETS_REFUSED, proc.stderr
    assert re.match(r"job \d+ submitted for host1\n", proc.stdout)
    assert "refused:" in proc.stdout and "host2" in proc.stdout
    as_json = dep.admin_run(
        "job", "submit", "--command", "true", "--host", "host1", "--host", "host2", bundle=alice
    )
    assert as_json.returncode == ExitCode.TARGETS_REFUSED
    assert json.loads(as_json.stdout)["accepted"] == ["host1"]

    only = admin_text(dep, "job", "submit", "--command", "true", "--host", "host2", bundle=alice)
    assert only.returncode == ExitCode.PERMISSION_DENIED, only.stderr
    assert admin_text(dep, "client", "accept", "host1", bundle=alice).returncode == (
        ExitCode.PERMISSION_DENIED
    )
    assert admin_text(dep, "job", "show", "9999").returncode == ExitCode.NOT_FOUND
    assert admin_text(dep, "client", "show", "nobody").returncode == ExitCode.NOT_FOUND

    pending = dep.submit("--command", "true", "--host", "host1")
    late = admin_text(dep, "job", "wait", str(pending), "--timeout", "0.5")
    assert late.returncode == ExitCode.NOT_FINISHED
    assert f"job {pending} still pending" in late.stderr
    closed = admin_text(dep, "client", "list", url=f"https://127.0.0.1:{free_port()}/")
    assert closed.returncode == ExitCode.UNREACHABLE
    assert "connection refused" in closed.stderr


def test_bad_arguments_are_refused_before_calling_the_server(running: Deployment) -> None:
    dep = running
    cases = {
        (
            "job",
            "submit",
            "--command",
            "true",
            "--host",
            "h",
            "--timeout",
            "0",
        ): "must be 1 or more",
        ("job", "submit", "--command", "true", "--host", "h", "--priority", "-5000"): "-1000",
        ("job", "submit", "--command", "true", "--host", "h", "--expires", "2001-01-01T00:00"): (
            "is in the past"
        ),
        ("job", "submit", "--command", "true", "--host", "h", "--not-before", "soon"): "ISO 8601",
        ("job", "wait", "1", "--timeout", "-1"): "positive number of seconds",
        ("job", "list", "--limit", "0"): "must be 1 or more",
        ("job", "list", "--state", "bogus"): "choose from 'pending'",
        ("client", "token", "--uses", "-3"): "must be 1 or more",
        ("job", "show", "x"): "not a whole number",
        ("job",): "required: COMMAND",
        (): "required: COMMAND",
    }
    for args, message in cases.items():
        proc = admin_text(dep, *args)
        assert proc.returncode == ExitCode.USAGE, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "area" not in proc.stderr and "_command" not in proc.stderr
    assert "expired" in admin_text(dep, "job", "list", "--state", "bogus").stderr
    http_url = admin_text(dep, "client", "list", url=dep.url.replace("https", "http"))
    assert http_url.returncode == ExitCode.USAGE
    assert "Scire speaks only HTTPS" in http_url.stderr


def test_binary_script_and_group_syntax(fleet: Deployment, tmp_path: Path) -> None:
    dep = fleet
    binary = tmp_path / "tool"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe binary")
    proc = admin_text(dep, "job", "submit", "--script", str(binary), "--host", "host1")
    assert proc.returncode == ExitCode.USAGE
    assert "is not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr
    for group in ("web", "@web"):
        answer = dep.admin("job", "submit", "--command", "true", "--group", group)
        assert answer["accepted"] == ["host1", "host2"], group


# --- job watch ---------------------------------------------------------------------------


def test_job_watch_follows_a_job_to_the_end(fleet: Deployment) -> None:
    dep = fleet
    job_id = dep.submit("--command", "echo hi", "--group", "web")
    watcher = subprocess.Popen(
        [
            _exe("scire-admin"),
            "--server",
            dep.url,
            "--bundle",
            str(dep.bundle),
            "job",
            "watch",
            str(job_id),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = json.loads(watcher.stdout.readline() if watcher.stdout else "{}")
    assert (first["job_id"], first["done"], first["total"]) == (job_id, 0, 2)
    assert first["counts"]["pending"] == 2
    dep.run_agent("host1")
    dep.run_agent("host2")
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == ExitCode.OK, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["done"] == 2 and lines[-1]["counts"]["succeeded"] == 2
    assert lines[-1]["hosts"] == {"host1": "succeeded", "host2": "succeeded"}
    # One object per change: no two lines in a row say the same.
    for before, after in zip([first, *lines], lines, strict=False):
        assert before["hosts"] != after["hosts"]


def test_job_watch_on_a_terminal_draws_a_progress_view(fleet: Deployment) -> None:
    dep = fleet
    job_id = dep.submit("--command", "true", "--group", "web")
    dep.run_agent("host1")
    dep.run_agent("host2")
    leader, follower = pty.openpty()
    # A terminal 100 columns wide, as rich reads the size from the terminal itself.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(
        [
            _exe("scire-admin"),
            "--server",
            dep.url,
            "--bundle",
            str(dep.bundle),
            "job",
            "watch",
            str(job_id),
        ],
        stdout=follower,
        stderr=subprocess.PIPE,
        env={**os.environ, "TERM": "xterm"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closes with the program
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == ExitCode.OK
    os.close(leader)
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode(errors="replace"))
    assert f"job {job_id} (command)" in screen
    assert "2/2 hosts final" in screen and "succeeded 2" in screen


# --- errors in words -----------------------------------------------------------------


class _TLSServer:
    """A TLS port with a chosen certificate (or plain HTTP), for the admin to fail on."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_servers() -> Iterator[list[_TLSServer]]:
    made: list[_TLSServer] = []
    yield made
    for server in made:
        server.close()


def _context_with(
    dep: Deployment, tmp_path: Path, names: list[str], expired: bool
) -> ssl.SSLContext:
    ca_key = certs.load_key((dep.state_dir / "ca.key").read_bytes())
    ca_cert = certs.load_cert((dep.state_dir / "ca.pem").read_bytes())
    key = certs.generate_key()
    if expired:
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(names[0]))]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
    else:
        cert = ca.issue_certificate(
            ca_key, ca_cert, key.public_key(), names[0], ca.ROLE_SERVER, names
        )
    cert_file, key_file = tmp_path / f"{names[0]}-{expired}.pem", tmp_path / f"{names[0]}.key"
    cert_file.write_bytes(certs.cert_to_pem(cert))
    key_file.write_bytes(certs.key_to_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def test_tls_failures_in_words(
    running: Deployment, tmp_path: Path, fake_servers: list[_TLSServer]
) -> None:
    dep = running
    other_root = tmp_path / "other"
    other_root.mkdir()
    subprocess.run(
        [
            _exe("scire-admin"),
            "init",
            "--state-dir",
            str(other_root / "server"),
            "--bundle",
            str(other_root / "admin.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    wrong_ca = admin_text(dep, "client", "list", bundle=other_root / "admin.pem")
    assert wrong_ca.returncode == ExitCode.UNREACHABLE
    assert "certificate from another CA" in wrong_ca.stderr

    plain = _TLSServer(None)
    fake_servers.append(plain)
    not_tls = admin_text(dep, "client", "list", url=plain.url)
    assert not_tls.returncode == ExitCode.UNREACHABLE
    assert "does not speak TLS" in not_tls.stderr

    wrong_name = _TLSServer(_context_with(dep, tmp_path, ["scire.example"], expired=False))
    fake_servers.append(wrong_name)
    name = admin_text(dep, "client", "list", url=wrong_name.url)
    assert name.returncode == ExitCode.UNREACHABLE
    assert "not valid for '127.0.0.1'" in name.stderr and "--alt-name" in name.stderr

    old = _TLSServer(_context_with(dep, tmp_path, ["127.0.0.1"], expired=True))
    fake_servers.append(old)
    expired = admin_text(dep, "client", "list", url=old.url)
    assert expired.returncode == ExitCode.UNREACHABLE
    assert "has expired" in expired.stderr
    for proc in (wrong_ca, not_tls, name, expired):
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_broken_pipe_exits_quietly(fleet: Deployment) -> None:
    dep = fleet
    job_id = dep.submit("--command", "seq 1 200000", "--host", "host1", "--output-limit", "2000000")
    dep.run_agent("host1")
    for flags in ("", "--json"):
        proc = subprocess.run(
            f"'{_exe('scire-admin')}' --server {dep.url} --bundle {dep.bundle} {flags} "
            f"job show {job_id} | head -1; exit ${{PIPESTATUS[0]}}",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        assert proc.stdout.count("\n") == 1


def test_user_add_to_an_unwritable_place_is_one_line(running: Deployment) -> None:
    proc = admin_text(running, "user", "add", "carol", "--out", "/proc/carol.pem")
    assert proc.returncode == ExitCode.ERROR
    assert proc.stderr.startswith("scire-admin: cannot write the bundle /proc/carol.pem")
    assert proc.stderr.count("\n") == 1
    # Refused before the server made the user.
    assert "carol" not in {u["name"] for u in running.admin("user", "list")}


# --- configuration, help, completion, man pages ------------------------------------------


def _handshake_as(dep: Deployment, host_name: str) -> ssl.SSLSocket:
    """A verified TLS handshake with the server, as a caller that reached it by ``host_name``."""
    context = tls.client_context(dep.state_dir / "ca.pem")
    raw = socket.create_connection(("127.0.0.1", dep.port), timeout=10)
    return context.wrap_socket(raw, server_hostname=host_name)


def test_server_certificate_reissued_with_another_name(running: Deployment) -> None:
    dep = running
    with pytest.raises(ssl.SSLCertVerificationError, match="scire2.example.test"):
        _handshake_as(dep, "scire2.example.test")
    dep.stop_server()
    answer = dep.admin_offline(
        "server-cert", "--state-dir", str(dep.state_dir), "--alt-name", "scire2.example.test"
    )
    assert answer["names"] == ["localhost", "127.0.0.1", "scire2.example.test"]
    assert answer["added"] == ["scire2.example.test"]
    dep.start_server()
    with _handshake_as(dep, "scire2.example.test") as tls_socket:
        assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
    # The old names still work, and so does everything signed before.
    assert dep.admin("server", "list")[0]["state"] == "running"


def test_default_config_file_means_no_flags(running: Deployment, tmp_path: Path) -> None:
    dep = running
    home = tmp_path / "home"
    (home / ".config" / "scire").mkdir(parents=True)
    (home / ".config" / "scire" / "admin.conf").write_text(
        f"[admin]\nserver = {dep.url}\nbundle = {dep.bundle}\ntimeout = 30\n"
    )
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.run(
        [_exe("scire-admin"), "--json", "user", "list"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert [u["name"] for u in json.loads(proc.stdout)] == ["admin"]
    (home / ".config" / "scire" / "admin.conf").write_text("[admin]\ntimeout = 0\n")
    bad = subprocess.run(
        [_exe("scire-admin"), "user", "list"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == ExitCode.USAGE
    assert "timeout must be a positive number" in bad.stderr


def _command_paths(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*path, name))


def test_every_help_has_examples_and_described_arguments() -> None:
    paths = list(_command_paths(admin_cli.build_parser()))
    assert ("job", "watch") in paths and ("completion",) in paths
    for path in paths:
        proc = subprocess.run(
            [_exe("scire-admin"), *path, "--help"], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, (path, proc.stderr)
        assert "examples:\n  # " in proc.stdout, path
        assert "scire-admin " + " ".join(path) in proc.stdout.split("examples:")[1], path
        positional = proc.stdout.split("positional arguments:")
        if len(positional) > 1:
            for line in positional[1].split("options:")[0].strip().splitlines():
                assert len(line.split(None, 1)) == 2 or line.startswith("    "), (path, line)
    top = subprocess.run([_exe("scire-admin"), "--help"], capture_output=True, text=True).stdout
    for code in ExitCode:
        if code in (
            ExitCode.ENROLLMENT_PENDING,
            ExitCode.ENROLLMENT_REFUSED,
            ExitCode.INSTANCE_CONFLICT,
        ):
            continue
        assert re.search(rf"^  {int(code)}\s+\S", top, re.M), code
    for program in ("scire-client", "scire-server"):
        text = subprocess.run([_exe(program), "--help"], capture_output=True, text=True).stdout
        assert "examples:" in text and "exit codes:" in text, program


def test_shell_completion_scripts() -> None:
    bash = subprocess.run(
        [_exe("scire-admin"), "completion", "bash"], capture_output=True, text=True, check=True
    ).stdout
    assert "watch" in bash and "--not-before" in bash
    subprocess.run(["bash", "-n"], input=bash, text=True, check=True)
    zsh = subprocess.run(
        [_exe("scire-admin"), "completion", "zsh"], capture_output=True, text=True, check=True
    ).stdout
    assert zsh.startswith("#compdef scire-admin") and "watch" in zsh


def test_man_pages_are_current(tmp_path: Path) -> None:
    import sys

    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make-manpages"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for program in ("scire-admin", "scire-client", "scire-server"):
        made = (tmp_path / f"{program}.1").read_text()
        assert made == (REPO / "docs" / "man" / f"{program}.1").read_text(), (
            f"docs/man/{program}.1 is stale: run scripts/make-manpages"
        )
        assert ".SH SYNOPSIS" in made
    assert "job watch" in (tmp_path / "scire-admin.1").read_text()
