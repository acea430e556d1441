"""A lost answer never makes a second job: ``scire-admin job submit`` sends one
request key per invocation, tries again with it when no answer comes back, and
the server answers a repeated key with the first job.

The answers are lost for real: ``scire-admin`` talks to a TLS man in the middle
(its certificate comes from the deployment's CA, so the CLI trusts it) that
passes each request on to the real server and, for the first few, throws the
server's answer away and resets the connection, as a network cut or a server
killed right after the commit would.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Deployment

from scire_schema import certs, files, tls
from scire_server import ca


class AnswerDroppingProxy:
    """Forwards each XML-RPC call to the server with the admin's bundle; the
    answers of the first ``drop`` calls never reach the caller."""

    def __init__(self, dep: Deployment, drop: int, workdir: Path) -> None:
        ca_file = dep.state_dir / "ca.pem"
        ca_key = certs.load_key((dep.state_dir / "ca.key").read_bytes())
        ca_cert = certs.load_cert(ca_file.read_bytes())
        key = certs.generate_key()
        cert = ca.issue_certificate(
            ca_key, ca_cert, key.public_key(), "127.0.0.1", ca.ROLE_SERVER, ["127.0.0.1"]
        )
        cert_file, key_file = workdir / "proxy.pem", workdir / "proxy.key"
        files.write_public(cert_file, certs.cert_to_pem(cert))
        files.write_private(key_file, certs.key_to_pem(key))
        self.front = tls.server_context(cert_file, key_file, ca_file)
        self.back = tls.client_context(ca_file, dep.bundle, dep.bundle)
        self.server_port = dep.port
        self.drop = drop
        self.calls: list[dict[str, object]] = []  # each call's spec, as the server got it
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return  # closed at the end of the test
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        with self.front.wrap_socket(raw, server_side=True) as conn:
            reader = conn.makefile("rb")
            request_line = reader.readline().decode("latin-1")
            headers: dict[str, str] = {}
            while (line := reader.readline().decode("latin-1").strip()) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = reader.read(int(headers["content-length"]))
            (params,), method = xmlrpc.client.loads(body)
            assert method == "admin.job_submit"
            self.calls.append(params)
            upstream = http.client.HTTPSConnection(
                "127.0.0.1", self.server_port, context=self.back, timeout=60
            )
            upstream.request("POST", request_line.split()[1], body, {"Content-Type": "text/xml"})
            answer = upstream.getresponse().read()
            upstream.close()
            if len(self.calls) <= self.drop:
                # The server has committed and answered; the caller gets a reset.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n"
                + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                + answer
            )

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def host1(running: Deployment) -> Deployment:
    running.enroll("host1")
    return running


@pytest.fixture
def proxy(host1: Deployment, tmp_path: Path) -> Iterator[AnswerDroppingProxy]:
    p = AnswerDroppingProxy(host1, drop=2, workdir=tmp_path)
    try:
        yield p
    finally:
        p.close()


def test_a_submission_whose_answers_are_lost_makes_one_job(
    host1: Deployment, proxy: AnswerDroppingProxy
) -> None:
    dep = host1
    proc = dep.admin_run(
        "job", "submit", "--command", "echo ran once", "--host", "host1", url=proxy.url
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["repeated"] is True  # the server had made it on the first call

    # Three calls reached the server (two answers lost: the stdlib transport's
    # own retry, then scire-admin's), all with the one key of this invocation.
    keys = {call["request_key"] for call in proxy.calls}
    assert len(proxy.calls) == 3 and len(keys) == 1
    (key,) = keys
    assert f"trying again in 1 s with the same request key {key}" in proc.stderr

    assert [job["id"] for job in dep.admin("job", "list")] == [answer["job_id"]]
    dep.run_agent("host1")
    (run,) = dep.wait_job(answer["job_id"])["assignments"]
    assert (run["state"], run["output"]) == ("succeeded", "ran once\n")


def test_a_script_passes_its_own_request_key(host1: Deployment) -> None:
    dep = host1
    key = "nightly-backup-2026-11-30"
    args = ("job", "submit", "--command", "echo backup", "--host", "host1", "--request-key", key)
    first, again = dep.admin(*args), dep.admin(*args)
    assert (first["repeated"], again["repeated"]) == (False, True)
    assert again["job_id"] == first["job_id"]
    assert len(dep.admin("job", "list")) == 1

    error = dep.admin_fails(
        "job", "submit", "--command", "echo other", "--host", "host1", "--request-key", key
    )
    assert f"request key {key} was used for job {first['job_id']} with another script" in error
    assert "Conflict, fault 8" in error
    assert "trying again" not in error  # a refusal is an answer: no retry

    error = dep.admin_fails(
        "job", "submit", "--command", "true", "--host", "host1", "--request-key", "x"
    )
    assert "request_key 'x' is not valid" in error
