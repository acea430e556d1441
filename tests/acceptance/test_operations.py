"""What an operator runs and watches: /healthz, /metrics, ``scire-server
check``, start-up errors in one line, JSON logs. Real servers, agents and
PostgreSQL; nothing mocked."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, PostgresCluster, _exe, free_port, wait_for


def https_get(dep: Deployment, path: str, bundle: Path | None = None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(dep.state_dir / "ca.pem"))
    if bundle is not None:
        context.load_cert_chain(str(bundle))
    conn = http.client.HTTPSConnection("127.0.0.1", dep.port, context=context, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in an exposition; 0 when it is absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == head:
            return float(value)
    return 0.0


def write_config(dep: Deployment, **keys: str) -> Path:
    path = dep.root / "server.ini"
    path.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    return path


def server_check(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _exe("scire-server"),
            "--state-dir",
            str(dep.state_dir),
            "--listen-port",
            str(dep.port),
            "--instance-key",
            f"test-{dep.port}",
            *(["--database-url", dep.database_url] if dep.database_url else []),
            *args,
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def lines_of(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``check``'s lines by check name: 'ok' or 'FAIL' and the words."""
    found = {}
    for line in proc.stdout.splitlines():
        verdict, rest = line.split(None, 1)
        name, _, words = rest.partition(": ")
        found[name] = f"{verdict} {words}"
    return found


# --- /healthz and /metrics ---------------------------------------------------------


def test_healthz_needs_no_certificate_and_metrics_need_a_user(deployment: Deployment) -> None:
    metrics_port = free_port()
    deployment.start_server("server", "--metrics-listen", f"127.0.0.1:{metrics_port}")
    assert https_get(deployment, "/healthz") == (200, "ok\n")
    status, body = https_get(deployment, "/metrics")
    assert status == 403
    assert "user's certificate" in body
    status, body = https_get(deployment, "/metrics", bundle=deployment.bundle)
    assert status == 200
    assert "# TYPE scire_rpc_calls_total counter" in body
    assert sample(body, "scire_database_up") == 1
    ends = sample(body, "scire_certificate_expiry_time_seconds", certificate="server")
    assert ends > time.time() + 86400
    # A non-admin user may scrape too: the scraper needs no power over the fleet.
    scraper = deployment.add_user("prometheus")
    assert https_get(deployment, "/metrics", bundle=scraper)[0] == 200
    # The plain-HTTP address answers the same without TLS.
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    status, body = http_get(metrics_port, "/metrics")
    assert status == 200
    assert "scire_listener_accepted_total" in body
    assert http_get(metrics_port, "/nothing")[0] == 404
    assert https_get(deployment, "/nothing")[0] == 404


def test_counters_move_after_a_known_workload(deployment: Deployment) -> None:
    metrics_port = free_port()
    config = write_config(deployment, metrics_refresh="1")
    deployment.start_server(
        "server", "-c", str(config), "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    before = http_get(metrics_port, "/metrics")[1]
    deployment.enroll("web-1")
    ok = deployment.submit("--command", "true", "--host", "web-1")
    bad = deployment.submit("--command", "exit 3", "--host", "web-1")
    deployment.run_agent("web-1")
    assert deployment.wait_job(ok)["state"] == "succeeded"
    assert deployment.wait_job(bad)["state"] == "failed"
    # A user who is not an administrator is refused an admin method.
    nobody = deployment.add_user("nobody")
    deployment.admin_fails("user", "list", bundle=nobody)

    def scrape() -> str:
        return http_get(metrics_port, "/metrics")[1]

    def settled() -> str | None:
        text = scrape()
        done = sample(text, "scire_assignments", state="succeeded") == 1
        done = done and sample(text, "scire_assignments", state="failed") == 1
        # Last-seen times are written in batches (last_seen_flush_interval).
        return text if done and sample(text, "scire_clients_online") == 1 else None

    after = wait_for(settled, 30, "the state gauges to show the two jobs")
    calls = "scire_rpc_calls_total"
    assert (
        sample(after, calls, method="admin.job_submit", fault="none")
        - sample(before, calls, method="admin.job_submit", fault="none")
        == 2
    )
    assert sample(after, calls, method="agent.poll", fault="none") >= 1
    # Each final report goes in agent.report_many; the job started right after the
    # poll was acknowledged as started, the other reported running on its own.
    assert sample(after, calls, method="agent.report_many", fault="none") >= 2
    assert sample(after, calls, method="agent.report", fault="none") >= 1
    assert sample(after, calls, method="admin.user_list", fault="forbidden") == 1
    assert sample(after, "scire_refusals_total", fault="forbidden", caller="user") == 1
    assert sample(after, "scire_clients", status="accepted") == 1
    assert sample(after, "scire_clients_online") == 1
    assert sample(after, "scire_listener_requests_total") > sample(
        before, "scire_listener_requests_total"
    )
    # What the agent's calls did: two deliveries, one report of each final state.
    assert sample(after, "scire_jobs_sent_total") == 2
    assert sample(after, "scire_jobs_acknowledged_total") >= 2
    assert sample(after, "scire_reports_total", state="succeeded") == 1
    assert sample(after, "scire_reports_total", state="failed") == 1
    assert sample(after, "scire_polls_total", result="work") >= 1
    assert sample(after, "scire_denials_total") == 0
    # The latency histogram has seen every poll, each within the +Inf bucket.
    duration = "scire_rpc_duration_seconds"
    polls = sample(after, calls, method="agent.poll", fault="none")
    assert sample(after, f"{duration}_count", method="agent.poll") == polls
    assert sample(after, f"{duration}_bucket", method="agent.poll", le="+Inf") == polls
    assert sample(after, f"{duration}_bucket", method="agent.poll", le="10") == polls
    assert sample(after, f"{duration}_sum", method="agent.poll") > 0
    assert "# TYPE scire_rpc_duration_seconds histogram" in after


def test_healthz_says_503_while_postgresql_refuses_connections(
    tmp_path: Path, xprocess: Any, postgres: PostgresCluster, postgres_url: str
) -> None:
    dep = Deployment(tmp_path, xprocess, database_url=postgres_url)
    try:
        dep.start_server()
        assert https_get(dep, "/healthz") == (200, "ok\n")
        database = postgres_url.rsplit("/", 1)[1]
        admin = f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres"

        def sql(statement: str) -> None:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(statement)

        sql(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")
        sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        status, body = wait_for(
            lambda: (r := https_get(dep, "/healthz"))[0] == 503 and r,
            30,
            "/healthz to say 503",
        )
        assert body == "unavailable: database not answering\n"  # no driver detail leaked
        sql(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")
        wait_for(lambda: https_get(dep, "/healthz") == (200, "ok\n"), 30, "/healthz to recover")
        assert "health: database unavailable" in dep.server_log()
    finally:
        for name in list(dep.servers):
            dep.stop_server(name)


# --- scire-server check ----------------------------------------------------------------


def test_check_passes_on_a_fresh_deployment(deployment: Deployment) -> None:
    proc = server_check(deployment)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines_of(proc)
    assert list(found) == ["config", "state dir", "certificates", "database", "peers", "port"]
    assert all(v.startswith("ok ") for v in found.values()), found
    assert "schema at" in found["database"]
    assert "days left" in found["certificates"]


def test_check_names_what_is_broken(deployment: Deployment) -> None:
    bad_config = write_config(deployment, colour="blue")
    proc = server_check(deployment, "-c", str(bad_config))
    assert proc.returncode == 1
    assert lines_of(proc) == {
        "config": "FAIL config file " + f"{bad_config}: unknown key(s) in [server]: colour"
    }

    # A server certificate from another CA.
    other = deployment.root / "other"
    subprocess.run(
        [
            _exe("scire-admin"),
            "--json",
            "init",
            "--state-dir",
            str(other),
            "--bundle",
            str(other / "a.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    original = (deployment.state_dir / "server.pem").read_bytes()
    shutil.copy(other / "server.pem", deployment.state_dir / "server.pem")
    shutil.copy(other / "server.key", deployment.state_dir / "server.key")
    proc = server_check(deployment)
    assert proc.returncode == 1
    assert lines_of(proc)["certificates"] == (
        f"FAIL {deployment.state_dir / 'server.pem'} was not signed by {deployment.state_dir / 'ca.pem'}"
    )
    (deployment.state_dir / "server.pem").write_bytes(original)
    proc = server_check(deployment)
    assert lines_of(proc)["certificates"].startswith(
        f"FAIL {deployment.state_dir / 'server.key'} is not the key of"
    )

    proc = server_check(deployment, "--state-dir", str(deployment.root / "missing"))
    assert proc.returncode == 1
    assert lines_of(proc)["state dir"].startswith(
        f"FAIL state directory {deployment.root / 'missing'} does not exist: run 'scire-admin init"
    )


def test_check_sees_the_port_taken_and_the_instance_key_held(deployment: Deployment) -> None:
    deployment.start_server()
    proc = server_check(deployment)
    assert proc.returncode == 1
    found = lines_of(proc)
    assert found["port"].startswith(f"FAIL cannot listen on 127.0.0.1:{deployment.port}: ")
    assert found["peers"].startswith(
        f"FAIL instance key test-{deployment.port} is held by a live daemon"
    )
    assert found["database"].startswith("ok ")


# --- start-up errors in one line ---------------------------------------------------------


def _read_only(path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``path`` mounted read-only (a private mount namespace),
    so even root cannot write there."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = f'mount --bind -o ro "{path}" "{path}" && exec "$@"'
    return subprocess.run(
        [*unshare, "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_read_only_state_dir_is_one_line_and_exit_1(deployment: Deployment) -> None:
    proc = _read_only(
        deployment.state_dir,
        _exe("scire-server"),
        "--state-dir",
        str(deployment.state_dir),
        "--listen-port",
        str(deployment.port),
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].endswith(
        f"ERROR cannot start: {deployment.state_dir} is read-only (Read-only file system): "
        "the SQLite database scire.db needs to write there"
    )


@pytest.mark.parametrize("kind", ["missing", "directory", "not utf-8"])
def test_unreadable_config_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "server.ini"
    if kind == "directory":
        path.mkdir()
    elif kind == "not utf-8":
        path.write_bytes(b"[server]\nstate_dir = \xff\n")
    proc = subprocess.run(
        [_exe("scire-server"), "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    expected = {
        "missing": f"scire-server: cannot read config file {path}: No such file or directory",
        "directory": f"scire-server: cannot read config file {path}: Is a directory",
        "not utf-8": f"scire-server: config file {path} is not UTF-8 text (byte 21)",
    }[kind]
    assert proc.stderr == expected + "\n"


# --- JSON logs ---------------------------------------------------------------------


def test_json_logs_on_both_sides_share_the_keys(deployment: Deployment) -> None:
    deployment.start_server("server", "--log-format", "json")
    deployment.enroll("web-1")
    job_id = deployment.submit("--command", "echo hi", "--host", "web-1")
    proc = deployment.agent("web-1", "--log-format", "json", "run")
    assert proc.returncode == 0, proc.stderr
    assert deployment.wait_job(job_id)["state"] == "succeeded"

    agent_lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    server_lines = [
        json.loads(line) for line in deployment.server_log().splitlines() if line.startswith("{")
    ]
    assert server_lines and agent_lines
    non_json = [
        line
        for line in deployment.server_log().splitlines()
        if line.strip() and not line.startswith(("{", "@@__xproc"))  # xprocess marker
    ]
    assert non_json == []
    for line in server_lines + agent_lines:
        assert {"time", "level", "program", "pid", "logger", "message"} <= set(line)

    instance = f"test-{deployment.port}"
    assert all(line["server"] == instance for line in server_lines)
    # The job the agent starts at once is acknowledged as started.
    moved = [line for line in server_lines if line.get("what") == "sent -> running"]
    assert moved and moved[0]["job"] == job_id and moved[0]["client"] == "web-1"
    assert moved[0]["who"] == "client:web-1"
    submitted = [line for line in server_lines if line.get("what") == "submitted"]
    assert submitted[0]["job"] == job_id and submitted[0]["who"] == "user:admin"

    assert all(line["client"] == "web-1" for line in agent_lines)
    ran = [line for line in agent_lines if line.get("job") == job_id and "what" in line]
    assert ran, agent_lines
    assert {line["server"] for line in ran} == {deployment.url}
    assert {line["who"] for line in ran} == {"client:web-1"}
    assert any(line["what"].endswith("-> succeeded") for line in ran)
